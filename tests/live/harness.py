"""Running test targets: start, wait for "ready", stop, parse the result line."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile


def symbols(path: Path) -> dict[str, int]:
    """Function symbols of an ELF file (link-time addresses)."""
    with open(path, "rb") as f:
        table = ELFFile(f).get_section_by_name(".symtab")
        return {s.name: s["st_value"] for s in table.iter_symbols() if s["st_info"]["type"] == "STT_FUNC" and s["st_value"]}


def text_section(path: Path) -> tuple[int, bytes]:
    with open(path, "rb") as f:
        section = ELFFile(f).get_section_by_name(".text")
        return section["sh_addr"], section.data()


@dataclass
class Running:
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30) -> dict[str, int]:
        """Tell the target to stop; its result line as a dict of ints."""
        out, _ = self.proc.communicate("stop\n", timeout=timeout)
        assert self.proc.returncode == 0, f"target exited with {self.proc.returncode}: {out!r}"
        line = out.strip().splitlines()[-1]
        return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", line)}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start(binary: Path, *args: str) -> Running:
    proc = subprocess.Popen([str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("ready"), f"target did not start: {line!r}"
    return Running(proc)
