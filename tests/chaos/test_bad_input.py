"""Bad input through `textpoke patch`: one clear line each, a distinct exit code per
class, and nothing written (the target's code and mappings are unchanged)."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from textpoke.poke import Patch, attach
from textpoke.x86.insn import NOP5, encode_call

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
                           f"call {syms['B']:#x} ({to_b.hex(' ')})\n"
                           "dry run: 1 of 1 site would be written in one batch; nothing was written\n")
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


# -- --site as the user types it -------------------------------------------------------------------


def test_site_spec_mistakes_are_named(hammer):
    """Each malformed --site is one line saying what is wrong with it, and nothing is written."""
    target, binary, syms = hammer
    maps = open(f"/proc/{target.pid}/maps").read()
    size = _function_size(binary, "site_caller")
    spec_hint = "textpoke: hint: give FUNC+OFFSET (main+0x1c or main+28), a function name, or an address (0x401136)"
    for spec, code, error, hint in (
        ("main+zz", 2, "--site 'main+zz': 'zz' is not an offset", spec_hint),
        ("site_caller+0x", 2, "--site 'site_caller+0x': '0x' is not an offset", spec_hint),
        ("+5", 2, "--site '+5' is neither an address nor FUNC+OFFSET", spec_hint),
        ("+main", 2, "--site '+main' has no function name before the '+'", spec_hint),
        ("-0x401000", 2, "--site '-0x401000' is neither an address nor FUNC+OFFSET", spec_hint),
        ("site_caller+0x100000", 5, f"site_caller+0x100000: offset 0x100000 is past the end of site_caller "
                                    f"({size:#x} bytes long); nothing was written",
         f"textpoke: hint: see the functions and their sites: `textpoke sites {target.pid} -f 'site_caller'`"),
        (f"site_caller+{size}", 5, f"site_caller+{size}: offset {size:#x} is past the end of site_caller "
                                   f"({size:#x} bytes long); nothing was written", None),
    ):
        done = _patch(target.pid, "--site", spec, "--nop")
        assert_one_error(done, code, error)
        if hint is not None:
            assert done.stderr.splitlines()[1] == hint
    _unchanged(target.pid, binary, maps)


def test_an_address_in_a_library_names_the_lib_option(hammer):
    target, binary, _ = hammer
    maps = open(f"/proc/{target.pid}/maps").read()
    libc = next(line for line in maps.splitlines() if "/libc.so" in line and " r-xp " in line)
    start, path = int(libc.split("-")[0], 16), libc.split()[-1]
    done = _patch(target.pid, "--site", f"{start + 0x10:#x}", "--nop")
    assert_one_error(done, 5, f"{start + 0x10:#x} is in {path}, not in {binary}; nothing was written")
    assert done.stderr.splitlines()[1] == (f"textpoke: hint: add --lib {os.path.basename(path)} to patch a site of "
                                           "that library")
    exe = next(int(line.split("-")[0], 16) for line in maps.splitlines() if line.endswith(str(binary)))
    done = _patch(target.pid, "--site", f"{exe + 0x10:#x}", "--nop", "--lib", "libc.so")
    assert done.returncode == 5 and done.stderr.splitlines()[1] == (
        "textpoke: hint: leave out --lib: the address is in the program itself")
    _unchanged(target.pid, binary, maps)


def _function_size(binary: Path, name: str) -> int:
    from elftools.elf.elffile import ELFFile

    with open(binary, "rb") as f:
        return next(s["st_size"] for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols() if s.name == name)


# -- --dry-run says what the real run would ---------------------------------------------------------


def test_dry_run_of_a_site_that_holds_its_new_bytes_says_unchanged(hammer):
    target, binary, syms = hammer
    site = syms["traced"]
    maps = open(f"/proc/{target.pid}/maps").read()
    dry = _patch(target.pid, "--site", "traced", "--nop", "--dry-run")
    assert (dry.returncode, dry.stdout) == (0, f"unchanged {site:#x} (traced+0x0): holds nop (0f 1f 44 00 00) already\n"
                                               "dry run: 0 of 1 site would be written in one batch; nothing was "
                                               "written\n")
    _unchanged(target.pid, binary, maps)
    real = _patch(target.pid, "--site", "traced", "--nop")
    assert real.returncode == 0 and real.stdout.splitlines()[0] == dry.stdout.splitlines()[0]
    assert real.stdout.splitlines()[1].startswith("0 of 1 site written in one batch (0 syncs)")


def test_dry_run_sees_another_session(hammer):
    """The real run would fail with exit 9 while another session holds the process; so does the dry run."""
    target, binary, syms = hammer
    with attach(target.pid) as session:
        maps = open(f"/proc/{target.pid}/maps").read()
        for extra in (("--dry-run",), ()):
            done = _patch(target.pid, "--site", "site_caller+0x9", "--call", "B", *extra)
            assert done.returncode == 9 and done.stdout == "", done.stderr
        assert_one_error(done, 9, f"another textpoke session is attached to process {target.pid}")
        dry = _patch(target.pid, "--site", "site_caller+0x9", "--call", "B", "--dry-run")
        assert_one_error(dry, 9, f"another textpoke session (pid {os.getpid()}) is attached to process "
                                 f"{target.pid}; the real run would be refused")
        assert open(f"/proc/{target.pid}/maps").read() == maps
        session.revert()
    _unchanged(target.pid, binary, open(f"/proc/{target.pid}/maps").read())


def test_dry_run_of_revert_reads_the_originals(hammer):
    target, binary, syms = hammer
    site = syms["site_caller"] + 9
    to_a, to_b = encode_call(site, syms["A"]), encode_call(site, syms["B"])
    assert _patch(target.pid, "--site", f"{site:#x}", "--call", "B").returncode == 0
    try:
        dry = _patch(target.pid, "--site", f"{site:#x}", "--revert", "--dry-run")
        assert dry.stdout.splitlines()[0] == (f"would patch {site:#x} (site_caller+0x9): call {syms['B']:#x} "
                                              f"({to_b.hex(' ')}) -> call {syms['A']:#x} ({to_a.hex(' ')})")
        assert read_mem(target.pid, site, 5) == to_b
        never = _patch(target.pid, "--site", "A", "--revert", "--dry-run")  # as the real run: refused
        assert_one_error(never, 5, f"{syms['A']:#x} (A+0x0) was never changed by textpoke; nothing was written")
    finally:
        assert run_cli("recover", "-p", str(target.pid)).returncode == 0


# -- recover names what it undid -------------------------------------------------------------------------


def test_recover_names_functions_and_counts_in_words(hammer):
    from textpoke.trampolines.counter import Counters

    target, binary, syms = hammer
    site = syms["site_caller"] + 9
    fentry = syms["traced"]
    to_a, to_b = encode_call(site, syms["A"]), encode_call(site, syms["B"])
    assert run_cli("recover", "-p", str(target.pid)).returncode == 0  # a clean slate
    before = _trampoline_regions(target.pid)
    with attach(target.pid) as session:
        counted = encode_call(fentry, Counters(session.resident, n=1, near=fentry).entry(0))
        session.apply([Patch(site=fentry, old=NOP5, new=counted), Patch(site=site, old=to_a, new=to_b)])
        session.close(revert=False)  # both stay changed
    regions = _trampoline_regions(target.pid)
    assert regions == before + 1
    dry = run_cli("recover", "-p", str(target.pid), "--dry-run")
    assert [line.split(":")[0] for line in dry.stdout.splitlines()[:-1]] == [
        f"{fentry:#x} (traced+0x0)", f"{site:#x} (site_caller+0x9)"]
    done = run_cli("recover", "-p", str(target.pid), "-v")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [f"{fentry:#x} (traced+0x0): {counted.hex(' ')} -> {NOP5.hex(' ')}",
                         f"{site:#x} (site_caller+0x9): {to_b.hex(' ')} -> {to_a.hex(' ')}"]
    assert lines[2] == f"process {target.pid}: 2 sites known to textpoke, 2 rewritten to their original bytes (3 syncs)"
    region_words = "1 trampoline region stays" if regions == 1 else f"{regions} trampoline regions stay"
    assert lines[3] == f"textpoke's handler and agent stay in the process, idle; {region_words} mapped, unused"
    assert read_mem(target.pid, site, 5) == to_a
    again = run_cli("recover", "-p", str(target.pid))
    assert again.stdout.splitlines()[0] == (f"process {target.pid}: 2 sites known to textpoke, 0 rewritten to their "
                                            "original bytes (0 syncs)")


def _trampoline_regions(pid: int) -> int:
    return len({line.split()[4] for line in open(f"/proc/{pid}/maps") if "/memfd:textpoke-" in line})


# -- refusals about who may touch the process -------------------------------------------------------------


def _cli_as_nobody(*args: str) -> tuple[int, str, str]:
    """`textpoke ARGS` run by user nobody (no capabilities): exit status, stdout, stderr.

    In a forked child of this process, since nobody cannot read this Python's
    installation; every module a command might load is imported first."""
    import importlib
    import pkgutil
    import sys
    import traceback  # noqa: F401  (a traceback, if any, must be printable)

    import textpoke
    from textpoke.cli import main

    for module in pkgutil.walk_packages(textpoke.__path__, "textpoke."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(out_r)
        os.close(err_r)
        sys.stdout, sys.stderr = open(out_w, "w"), open(err_w, "w")
        code = 99
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    with open(out_r) as out, open(err_r) as err:
        stdout, stderr = out.read(), err.read()
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status), stdout, stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the tool as user nobody on root's process")
def test_another_users_process_is_one_line_exit_4(hammer):
    """patch and recover by an unprivileged user on another user's process: the
    reason in one line, exit 4 (they read /proc/PID/maps first, which the kernel
    refuses to such a user)."""
    target, binary, _ = hammer
    maps = open(f"/proc/{target.pid}/maps").read()
    reason = f"may not access process {target.pid}: it belongs to user root and you are nobody without CAP_SYS_PTRACE"
    for args in (("patch", "-p", str(target.pid), "--site", "traced", "--nop"),
                 ("patch", "-p", str(target.pid), "--site", "traced", "--nop", "--dry-run"),
                 ("recover", "-p", str(target.pid)),
                 ("recover", "-p", str(target.pid), "--dry-run")):
        code, out, err = _cli_as_nobody(*args)
        assert (code, out, err.splitlines()[0]) == (4, "", f"textpoke: error: {reason}"), err
        assert len(err.splitlines()) == 2 and err.splitlines()[1].startswith("textpoke: hint: "), err
    _unchanged(target.pid, binary, maps)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_process_under_strace_gets_the_tracer_hint(build_target):
    """Another tracer holds the process: the hint says to detach it, not to change user."""
    binary = build_target("hammer")
    target = Target([str(binary), "0"])  # a fresh process: attaching means borrowing a thread
    strace = subprocess.Popen(["strace", "-o", "/dev/null", "-p", str(target.pid)], stderr=subprocess.DEVNULL)
    try:
        while "TracerPid:\t0\n" in open(f"/proc/{target.pid}/status").read():
            time.sleep(0.01)
        maps = open(f"/proc/{target.pid}/maps").read()
        for extra in ((), ("--dry-run",)):  # the dry run says what the real run would
            done = _patch(target.pid, "--site", "traced", "--call", "A", *extra)
            assert_one_error(done, 4, f"may not ptrace process {target.pid}: it is already traced by pid "
                                      f"{strace.pid} (strace); detach that tracer first")
            assert done.stderr.splitlines()[1] == (
                "textpoke: hint: a process has one tracer at a time: detach that one (quit strace; `detach` in "
                "gdb), then run textpoke again")
        assert open(f"/proc/{target.pid}/maps").read() == maps
        _unchanged(target.pid, binary, maps)
    finally:
        strace.terminate()
        strace.wait()
        target.kill()


def test_a_function_without_an_fentry_site(build_target):
    binary = build_target("hammer", fentry=False)
    target = Target([str(binary), "0"])
    try:
        maps = open(f"/proc/{target.pid}/maps").read()
        assert_one_error(_patch(target.pid, "--site", "traced", "--nop"), 5,
                         "1 function matches 'traced' but it has no fentry nop5 site")
        assert_one_error(_patch(target.pid, "--site", "[AB]", "--nop"), 5,
                         "2 functions match '[AB]' but none has an fentry nop5 site")
        _unchanged(target.pid, binary, maps)
    finally:
        target.kill()


def test_dry_run_of_a_stopped_process_is_refused_as_the_real_run(hammer):
    target, binary, _ = hammer
    maps = open(f"/proc/{target.pid}/maps").read()
    os.kill(target.pid, signal.SIGSTOP)
    try:
        while "State:\tT" not in open(f"/proc/{target.pid}/status").read():
            time.sleep(0.005)
        for extra in ((), ("--dry-run",)):
            assert_one_error(_patch(target.pid, "--site", "site_caller+0x9", "--call", "B", *extra), 14,
                             f"process {target.pid} is stopped (SIGSTOP or a debugger); textpoke needs it running")
    finally:
        os.kill(target.pid, signal.SIGCONT)
    _unchanged(target.pid, binary, maps)
