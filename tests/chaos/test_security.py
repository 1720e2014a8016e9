"""Security: refuse where ptrace is not permitted (naming why), private shared memory
with no path, no page writable and executable, no write outside validated sites."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from textpoke import OwnCodeRefused, SiteError
from textpoke.poke import Patch, attach
from textpoke.poke.resident import SHARED_MODE, find_regions
from textpoke.poke.safety import check_addresses
from textpoke.target.maps import Mapping, read_maps
from textpoke.target.process import refusal_reason
from textpoke.target.security import ours, shared_modes, writable_and_executable
from textpoke.trampolines.counter import Counters
from textpoke.x86.insn import NOP5, encode_call

from .harness import Target, assert_one_error, read_mem, symbols

ROOT_STATUS = {"TracerPid": "0", "Uid": "0\t0\t0\t0", "CapPrm": "000001ffffffffff", "State": "S (sleeping)"}
ALL_CAPS = 0x1FF_FFFF_FFFF
NO_PTRACE = ALL_CAPS & ~(1 << 19)


def _reason(status: dict[str, str], **overrides: object) -> str:
    me = {"my_pid": 100, "my_uid": 0, "my_caps": ALL_CAPS, "my_permitted": ALL_CAPS, "yama_scope": None}
    me.update(overrides)
    return refusal_reason(status, **me)  # type: ignore[arg-type]


def test_refusal_reasons_name_the_cause():
    nobody = {**ROOT_STATUS, "Uid": "65534\t65534\t65534\t65534", "CapPrm": "0"}
    assert _reason(nobody, my_caps=NO_PTRACE, my_permitted=NO_PTRACE) == (
        "it belongs to user nobody and you are root without CAP_SYS_PTRACE")
    assert _reason(ROOT_STATUS, my_caps=NO_PTRACE, my_permitted=NO_PTRACE) == (
        f"it has capabilities you lack (CapPrm {ALL_CAPS:#x}, yours {NO_PTRACE:#x}) and you have no CAP_SYS_PTRACE")
    assert _reason(ROOT_STATUS, yama_scope="3") == "yama ptrace_scope is 3: ptrace is disabled on this machine"
    for scope in ("1", "2"):
        assert _reason(nobody, my_uid=65534, my_caps=0, my_permitted=0, yama_scope=scope) == (
            f"yama ptrace_scope is {scope}: only root (CAP_SYS_PTRACE) may attach to non-children")
    assert _reason(ROOT_STATUS, yama_scope="1") != ""  # root with CAP_SYS_PTRACE passes yama 1: generic reason
    assert _reason({**ROOT_STATUS, "TracerPid": "42"}, tracer_name="gdb") == (
        "it is already traced by pid 42 (gdb); detach that tracer first")


@pytest.mark.skipif(shutil.which("capsh") is None or shutil.which("setpriv") is None, reason="needs capsh and setpriv")
def test_refused_without_permission_naming_the_reason(build_target):
    """A tool without CAP_SYS_PTRACE: another user's process, and root's own
    (which has capabilities the tool lacks): exit 4, the reason, nothing written."""
    binary = build_target("hammer")
    syms = symbols(binary)
    site = syms["site_caller"] + 9
    others = Target(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(binary), "2"])
    roots = Target([str(binary), "2"])
    try:
        caps = int(dict(line.split(":", 1) for line in open(f"/proc/{roots.pid}/status"))["CapPrm"], 16)
        without = caps & ~(1 << 19)  # what capsh leaves us: CAP_SYS_PTRACE dropped
        for target, reason in (
            (others, "it belongs to user nobody and you are root without CAP_SYS_PTRACE"),
            (roots, f"it has capabilities you lack (CapPrm {caps:#x}, yours {without:#x}) "
                    "and you have no CAP_SYS_PTRACE"),
        ):
            maps = open(f"/proc/{target.pid}/maps").read()
            command = f"exec {sys.executable} -m textpoke patch -p {target.pid} --site {site:#x} --call B"
            done = subprocess.run(["capsh", "--drop=cap_sys_ptrace", "--", "-c", command],
                                  capture_output=True, text=True, timeout=120)
            assert_one_error(done, 4, f"may not access process {target.pid}: {reason}")
            assert read_mem(target.pid, site, 5) == encode_call(site, syms["A"])
            assert open(f"/proc/{target.pid}/maps").read() == maps
    finally:
        others.kill()
        roots.kill()


def _fds(pid: int) -> dict[str, str]:
    return {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def _entries(path: str) -> set[str]:
    return set(os.listdir(path))


def test_shared_memory_is_private_and_has_no_path(build_target):
    """Every memfd of ours is mode 0600; no file of ours in /dev/shm or /tmp;
    no mapping writable and executable, after attach and after trampolines."""
    binary = build_target("hammer")
    syms = symbols(binary)
    before = {d: _entries(d) for d in ("/dev/shm", "/tmp")}
    target = Target([str(binary), "4"])
    try:
        fds = _fds(target.pid)
        with attach(target.pid) as session:
            maps = session.process.maps()
            assert set(shared_modes(target.pid, maps).values()) == {SHARED_MODE} == {0o600}
            assert writable_and_executable(maps) == []
            code = [m for m in ours(maps) if m.start == session.resident.base]
            assert [m.perms for m in code] == ["r-xs"]
            site = syms["traced"]
            counters = Counters(session.resident, n=1, near=site)  # trampolines, as tracing maps them
            session.apply([Patch(site=site, old=NOP5, new=encode_call(site, counters.entry(0)))])
            maps = session.process.maps()
            modes = shared_modes(target.pid, maps)
            assert len(modes) == 2 and set(modes.values()) == {0o600}
            assert writable_and_executable(maps) == []
            tramp = [m for m in ours(maps) if m.path.startswith("/memfd:textpoke-counters")]
            assert sorted(m.perms for m in tramp) == ["r-xs", "rw-s"]
            added = {fd: link for fd, link in _fds(target.pid).items() if fds.get(fd) != link}
            # Ours: the resident region's (kept for later sessions), the agent's /proc/self/mem
            # and this tool's pidfd (for healing a batch if the tool dies); none of the trampolines'.
            assert sorted(added.values()) == sorted(["/memfd:textpoke (deleted)", f"/proc/{target.pid}/mem",
                                                     "anon_inode:[pidfd]"])
            local = os.stat(f"/proc/{target.pid}/map_files/{tramp[0].start:x}-{tramp[0].end:x}")
            assert stat.S_IMODE(local.st_mode) == 0o600
        assert writable_and_executable(read_maps(target.pid)) == []
        # The tool's pidfd goes with its session.
        assert "anon_inode:[pidfd]" not in {link for fd, link in _fds(target.pid).items() if fds.get(fd) != link}
        for directory, entries in before.items():
            new = _entries(directory) - entries
            assert not [n for n in new if "textpoke" in n or directory == "/dev/shm"], (directory, new)
    finally:
        target.kill()


def test_no_write_outside_program_code(build_target):
    """Session.apply refuses, before writing anything: a site in data, a site in
    textpoke's own code, a call to non-executable memory."""
    binary = build_target("hammer")
    syms = symbols(binary)
    site = syms["site_caller"] + 9
    to_a = encode_call(site, syms["A"])
    target = Target([str(binary), "2"])
    try:
        with attach(target.pid) as session:
            handler = session.resident.labels["handler"]
            data = next(m for m in session.process.maps() if m.writable and not m.executable and m.inode)
            syncs = session.stats().syncs
            cases = [
                (SiteError, f"{data.start:#x} is not in executable memory of process {target.pid}",
                 Patch(site=data.start, old=NOP5, new=NOP5)),
                (OwnCodeRefused, f"{handler:#x} is inside textpoke's own code or data in process {target.pid}",
                 Patch(site=handler, old=NOP5, new=NOP5)),
                (SiteError, f"the call written at {site:#x} would go to {syms['made']:#x}, which is not executable",
                 Patch(site=site, old=to_a, new=encode_call(site, syms["made"]))),
            ]
            for error, message, patch in cases:
                with pytest.raises(error, match=re.escape(message)):
                    session.apply([patch])
            assert session.stats().syncs == syncs
            assert read_mem(target.pid, site, 5) == to_a
            assert session.resident.table.lookup(site) is None and len(session.resident.ledger) == 0
        assert target.alive()
    finally:
        target.kill()


@dataclass(frozen=True)
class _FakeProcess:
    pid: int
    mappings: tuple[Mapping, ...]

    def maps(self) -> list[Mapping]:
        return list(self.mappings)


def test_no_call_into_the_resident_handler():
    """A call written into textpoke's handler would run it outside a signal: refused
    (the handler is never within rel32 reach of a live program's text, so this
    one is checked on a fabricated map)."""
    text = Mapping(0x400000, 0x401000, "r-xp", 0, "08:01", 7, "/bin/prog")
    handler = Mapping(0x402000, 0x403000, "r-xs", 0, "00:01", 9, "/memfd:textpoke (deleted)")
    tramp = Mapping(0x404000, 0x405000, "r-xs", 0, "00:01", 10, "/memfd:textpoke-tramp (deleted)")
    process = _FakeProcess(1, (text, handler, tramp))
    site = 0x400100
    with pytest.raises(OwnCodeRefused, match=re.escape(
            f"the call written at {site:#x} would go into textpoke's resident handler at {handler.start:#x}")):
        check_addresses(process, [Patch(site=site, old=NOP5, new=encode_call(site, handler.start))])  # type: ignore[arg-type]
    check_addresses(process, [Patch(site=site, old=NOP5, new=encode_call(site, tramp.start))])  # type: ignore[arg-type]
    with pytest.raises(SiteError, match=re.escape(f"{text.end - 2:#x} is not in executable memory of process 1")):
        check_addresses(process, [Patch(site=text.end - 2, old=NOP5, new=NOP5)])  # type: ignore[arg-type]


def _as_nobody(work, *args) -> object:
    """Run ``work(*args)`` in a forked child that is user nobody (no capabilities):
    its result, or the exception's ``type: message``, through a pipe."""
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result: object = work(*args)
        except BaseException as exc:  # reported to the test
            result = f"{type(exc).__name__}: {exc}"
        os.write(write_fd, pickle.dumps(result))
        os._exit(0)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    os.waitpid(child, 0)
    return pickle.loads(data)


def _session_as_user(pid: int, site: int) -> tuple[bool, int, int]:
    """Attach, count calls through ``site`` for a moment, revert: (installed, calls, regions)."""
    with attach(pid) as session:
        counters = Counters(session.resident, n=1, near=site)
        session.apply([Patch(site=site, old=NOP5, new=encode_call(site, counters.entry(0)))])
        time.sleep(0.05)
        calls = int(counters.counts()[0])
        session.revert()
        return session.resident.created, calls, len(find_regions(session.process))


@pytest.mark.skipif(os.geteuid() != 0, reason="starts the target and the tool as user nobody")
def test_same_user_without_privileges_attaches_and_attaches_again(build_target):
    """A tool of the target's own user, without capabilities (no map_files): the
    first attach installs, the second adopts that install (through the
    descriptor the resident part keeps), and both count calls."""
    binary = build_target("hammer")
    site = symbols(binary)["traced"]
    target = Target(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(binary), "2"])
    try:
        first = _as_nobody(_session_as_user, target.pid, site)
        second = _as_nobody(_session_as_user, target.pid, site)
        assert isinstance(first, tuple) and isinstance(second, tuple), (first, second)
        assert (first[0], second[0]) == (True, False)  # installed once, then adopted
        assert first[1] > 0 and second[1] > 0
        assert (first[2], second[2]) == (1, 1)
        assert read_mem(target.pid, site, 5) == NOP5
    finally:
        target.kill()
