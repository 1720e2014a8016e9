"""Bad input through `textpoke patch`: one clear line each, a distinct exit code per
class, and nothing written (the target's code and mappings are unchanged)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from textpoke.poke import Patch, attach
from textpoke.x86.insn import encode_call

from .harness import Target, assert_one_error, read_mem, run_cli, symbols, text_section


@pytest.fixture(scope="module")
def hammer(build_target):
    binary = build_target("hammer")
    target = Target([str(binary), "0"])  # no worker: these tests measure refusals, not load
    yield target, binary, symbols(binary)
    target.kill()


def _unchanged(pid: int, binary: Path, maps: str):
    """Checks that the whole text and the mappings of ``pid`` are as before."""
    address, text = text_section(binary)
    assert read_mem(pid, address, len(text)) == text
    assert open(f"/proc/{pid}/maps").read() == maps


def _patch(pid: int, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("patch", "-p", str(pid), *args)


def test_unknown_pid():
    beyond = int(open("/proc/sys/kernel/pid_max").read()) + 1
    assert_one_error(_patch(beyond, "--site", "0x401000", "--nop"), 3, f"no process with pid {beyond}")


def test_zombie():
    child = subprocess.Popen(["true"])
    try:
        while "State:\tZ" not in open(f"/proc/{child.pid}/status").read():
            time.sleep(0.005)
        done = _patch(child.pid, "--site", "0x401000", "--nop")
        assert_one_error(done, 10, f"process {child.pid} is a zombie (exited, not yet reaped)")
    finally:
        child.wait()


def _kernel_thread() -> int | None:
    for name in sorted(os.listdir("/proc"), key=lambda n: (len(n), n)):
        if not name.isdigit():
            continue
        try:
            status = open(f"/proc/{name}/status").read()
        except OSError:
            continue
        if "\nKthread:\t1" in status or ("\nPPid:\t2\n" in status and not os.path.exists(f"/proc/{name}/exe")):
            return int(name)
    return None


def test_kernel_thread():
    pid = _kernel_thread()
    if pid is None:
        pytest.skip("no kernel thread is visible in this pid namespace")
    assert_one_error(_patch(pid, "--site", "0x401000", "--nop"), 10, f"pid {pid} is a kernel thread")


def _i386_program(path: Path) -> int:
    """A static i386 ELF that loops on pause(): returns its entry point."""
    base = 0x0804_8000
    code = bytes.fromhex("b81d000000" "cd80" "ebf7")  # mov eax, 29 (pause); int 0x80; jmp back
    entry = base + 52 + 32
    header = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIIIIIHHHHHH", 2, 3, 1, entry, 52, 0, 0, 52, 32, 1, 40, 0, 0)
    size = 52 + 32 + len(code)
    program = struct.pack("<IIIIIIII", 1, 0, base, base, size, size, 5, 0x1000)
    path.write_bytes(header + program + code)
    path.chmod(0o755)
    return entry


def test_non_x86_64_process(tmp_path):
    binary = tmp_path / "i386-pause"
    entry = _i386_program(binary)
    try:
        proc = subprocess.Popen([str(binary)])
    except OSError as exc:
        pytest.skip(f"this kernel does not run i386 programs: {exc}")
    try:
        time.sleep(0.1)
        if proc.poll() is not None:
            pytest.skip("this kernel does not run i386 programs")
        maps, code = open(f"/proc/{proc.pid}/maps").read(), read_mem(proc.pid, entry, 9)
        done = _patch(proc.pid, "--site", f"{entry:#x}", "--nop")
        assert_one_error(done, 6, f"process {proc.pid} runs a 32-bit i386 program; "
                                  "textpoke patches x86-64 processes only")
        assert (open(f"/proc/{proc.pid}/maps").read(), read_mem(proc.pid, entry, 9)) == (maps, code)
    finally:
        proc.kill()
        proc.wait()


def _inside_an_instruction(binary, start: int) -> int:
    """The address of the second byte of the first multi-byte instruction objdump decodes from ``start``."""
    out = subprocess.run(["objdump", "-d", "-w", f"--start-address={start:#x}", str(binary)],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[0].strip().endswith(":") and len(fields[1].split()) >= 3:
            return int(fields[0].strip().rstrip(":"), 16) + 1
    raise AssertionError("objdump decoded no multi-byte instruction")


def test_stripped_binary(tmp_path, build_target):
    if shutil.which("strip") is None:
        pytest.skip("needs strip (binutils)")
    stripped = tmp_path / "hammer-stripped"
    shutil.copy(build_target("hammer"), stripped)
    subprocess.run(["strip", "--strip-all", str(stripped)], check=True)
    target = Target([str(stripped), "2"])
    try:
        maps = open(f"/proc/{target.pid}/maps").read()
        address, text = text_section(stripped)
        for args, what in ((("--site", "traced"), "no function matches 'traced'"),
                           (("--site", "traced+0x4"), "function traced not found")):
            done = _patch(target.pid, *args, "--nop")
            assert_one_error(done, 12, f"{what}: {stripped} is stripped (no symbol table): only its exported "
                                       "functions have names, the others are sub_<address> (from .eh_frame)")
        # An address is checked by decoding its function from the start .eh_frame gives:
        # the second byte of a multi-byte instruction (objdump's) is refused as such.
        inside = _inside_an_instruction(stripped, address)
        done = _patch(target.pid, "--site", f"{inside:#x}", "--nop")
        lines = done.stderr.splitlines()
        assert done.returncode == 5 and len(lines) == 2 and "Traceback" not in done.stderr, done.stderr
        assert lines[0].startswith(f"textpoke: error: {inside:#x} (sub_"), done.stderr
        assert "is not an instruction start" in lines[0], done.stderr
        assert read_mem(target.pid, address, len(text)) == text
        assert open(f"/proc/{target.pid}/maps").read() == maps
    finally:
        target.kill()


def test_function_not_found(hammer):
    target, binary, _ = hammer
    maps = open(f"/proc/{target.pid}/maps").read()
    assert_one_error(_patch(target.pid, "--site", "nosuch+0x4", "--nop"), 12,
                     f"function nosuch not found in {binary}")
    assert_one_error(_patch(target.pid, "--site", "site_caller+9", "--call", "nosuch"), 12,
                     f"function nosuch not found in {binary}")
    _unchanged(target.pid, binary, maps)


def test_glob_matching_nothing(hammer):
    target, binary, _ = hammer
    maps = open(f"/proc/{target.pid}/maps").read()
    assert_one_error(_patch(target.pid, "--site", "zz*", "--nop"), 12, f"no function of {binary} matches 'zz*'")
    assert_one_error(_patch(target.pid, "--retarget", "zz*:A:B"), 12, f"no function of {binary} matches 'zz*'")
    _unchanged(target.pid, binary, maps)


def test_not_on_an_instruction_boundary(hammer):
    target, binary, syms = hammer
    maps = open(f"/proc/{target.pid}/maps").read()
    site = syms["site_caller"] + 9
    done = _patch(target.pid, "--site", "site_caller+10", "--call", "B")
    assert_one_error(done, 5, f"{site + 1:#x} (site_caller+0xa) is not an instruction start: it is inside "
                              f"`call 0x{syms['A']:016x}` (5 bytes) at {site:#x}")
    _unchanged(target.pid, binary, maps)


def test_bytes_changed_since_discovery(hammer):
    target, binary, syms = hammer
    site = syms["site_caller"] + 9
    found = run_cli("sites", str(target.pid), "-f", "site_caller", "--kind", "call", "--json")
    discovered = next(s for s in __import__("json").loads(found.stdout) if s["address"] == site)["bytes"]
    to_a, to_b = encode_call(site, syms["A"]), encode_call(site, syms["B"])
    assert discovered == to_a.hex()
    with attach(target.pid) as session:  # someone changes the code after discovery
        session.apply([Patch(site=site, old=to_a, new=to_b)])
        session.close(revert=False)  # the change stays
    try:
        maps = open(f"/proc/{target.pid}/maps").read()
        done = _patch(target.pid, "--site", f"{site:#x}", "--nop", "--expect", discovered)
        assert_one_error(done, 11, f"{site:#x} (site_caller+0x9) holds {to_b.hex(' ')}, expected {to_a.hex(' ')}")
        assert read_mem(target.pid, site, 5) == to_b
        assert open(f"/proc/{target.pid}/maps").read() == maps
    finally:
        assert run_cli("recover", "-p", str(target.pid)).returncode == 0
    _unchanged(target.pid, binary, open(f"/proc/{target.pid}/maps").read())


def test_site_inside_our_own_handler(hammer):
    target, binary, _ = hammer
    with attach(target.pid) as session:
        handler = session.resident.labels["handler"]
        code = read_mem(target.pid, session.resident.base, 4096)
    maps = open(f"/proc/{target.pid}/maps").read()
    for address in (handler, handler + 0x10):
        done = _patch(target.pid, "--site", f"{address:#x}", "--nop")
        assert_one_error(done, 5, f"{address:#x} is inside textpoke's own code or data in process {target.pid} "
                                  "(/memfd:textpoke); nothing was written")
    assert read_mem(target.pid, handler & ~0xFFF, 4096) == code
    _unchanged(target.pid, binary, maps)


def test_usage_errors(hammer):
    target, binary, _ = hammer
    maps = open(f"/proc/{target.pid}/maps").read()
    assert_one_error(_patch(target.pid, "--site", "traced"), 2,
                     "give exactly one of --call, --jmp, --nop, --revert, --retarget")
    done = _patch(target.pid, "--site", "traced", "--nop", "--call", "A")
    assert done.returncode == 2 and "(got --call, --nop)" in done.stderr
    assert_one_error(_patch(target.pid, "--site", "traced", "--nop", "--expect", "zz"), 2,
                     "--expect 'zz' is not hex bytes")
    _unchanged(target.pid, binary, maps)


def test_dry_run_writes_nothing_and_a_real_patch_stays(hammer):
    target, binary, syms = hammer
    site = syms["site_caller"] + 9
    to_a, to_b = encode_call(site, syms["A"]), encode_call(site, syms["B"])
    maps = open(f"/proc/{target.pid}/maps").read()
    done = _patch(target.pid, "--site", "site_caller+0x9", "--call", "B", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"would patch {site:#x} (site_caller+0x9): call {syms['A']:#x} ({to_a.hex(' ')}) -> "
                           f"call {syms['B']:#x} ({to_b.hex(' ')})\n")
    _unchanged(target.pid, binary, maps)
    done = _patch(target.pid, "--site", "site_caller+0x9", "--call", "B", "--expect", to_a.hex())
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == (f"patched {site:#x} (site_caller+0x9): call {syms['A']:#x} "
                                           f"({to_a.hex(' ')}) -> call {syms['B']:#x} ({to_b.hex(' ')})")
    assert read_mem(target.pid, site, 5) == to_b
    with attach(target.pid) as session:  # a committed change survives a later attach
        assert not session.recovery.written and session.read_insn(site) == to_b
    assert read_mem(target.pid, site, 5) == to_b
    done = _patch(target.pid, "--site", "site_caller+0x9", "--revert")
    assert done.returncode == 0, done.stderr
    assert read_mem(target.pid, site, 5) == to_a
    done = _patch(target.pid, "--retarget", "site_caller:A:B")
    assert (done.returncode, read_mem(target.pid, site, 5)) == (0, to_b)
    done = _patch(target.pid, "--retarget", "site_caller:A:B")
    assert_one_error(done, 5, "no call or jmp to A in functions matching 'site_caller' (1 changed already)")
    assert run_cli("recover", "-p", str(target.pid)).returncode == 0
    address, text = text_section(binary)
    assert read_mem(target.pid, address, len(text)) == text
