"""The restore frame of a borrowed thread, as bytes (pure logic; the live side is
tests/chaos/test_kill_install.py)."""

from __future__ import annotations

import struct

import pytest

from textpoke.target import inject, sigframe
from textpoke.target._ptrace import Regs

U64 = 0xFFFF_FFFF_FFFF_FFFF
READ = 0
NANOSLEEP = 230


def regs(**changes: int) -> Regs:
    base = {name: 0 for name in Regs._fields}
    base.update(rip=0x401002, rsp=0x7FFF_0000_1000, cs=0x33, ss=0x2B, eflags=0x246, orig_rax=U64,
                rax=0x1111, rdi=3, rsi=0x5000, rdx=64)
    base.update(changes)
    return Regs(**base)


def neg(errno_value: int) -> int:
    return (-errno_value) & U64


@pytest.mark.parametrize("error", [sigframe.ERESTARTSYS, sigframe.ERESTARTNOINTR, sigframe.ERESTARTNOHAND])
def test_an_interrupted_syscall_is_rewound_to_run_again(error):
    state = sigframe.resumed_state(regs(orig_rax=READ, rax=neg(error)), restart_block_intact=False)
    assert (state.rip, state.rax, state.orig_rax) == (0x401000, READ, U64)
    assert (state.rdi, state.rsi, state.rdx) == (3, 0x5000, 64)  # its arguments, untouched


def test_restart_block_syscall_goes_through_restart_syscall_only_while_the_block_lives():
    interrupted = regs(orig_rax=NANOSLEEP, rax=neg(sigframe.ERESTART_RESTARTBLOCK))
    ptrace_restore = sigframe.resumed_state(interrupted, restart_block_intact=True)
    assert (ptrace_restore.rip, ptrace_restore.rax) == (0x401000, sigframe.SYS_restart_syscall)
    # rt_sigreturn resets the restart block: restart_syscall would return EINTR; issue it again.
    after_sigreturn = sigframe.resumed_state(interrupted, restart_block_intact=False)
    assert (after_sigreturn.rip, after_sigreturn.rax) == (0x401000, NANOSLEEP)


@pytest.mark.parametrize("changes", [dict(), dict(orig_rax=READ, rax=12), dict(orig_rax=READ, rax=neg(4))])
def test_user_code_and_finished_syscalls_resume_as_they_are(changes):
    before = regs(**changes)
    assert sigframe.resumed_state(before, restart_block_intact=False) == before._replace(orig_rax=U64)


def xstate(size: int = 1088) -> bytes:
    area = bytearray(size)
    struct.pack_into("<Q", area, sigframe.SW_BYTES, 0x7)  # ptrace: XCR0 here
    struct.pack_into("<I", area, 24, 0x1F80)  # MXCSR
    struct.pack_into("<Q", area, 512, 0x7)  # XSTATE_BV
    area[160:176] = bytes(range(16))  # xmm0
    return bytes(area)


def test_frame_layout_matches_the_kernels_rt_sigframe():
    at = 0x7FFF_0000_0000
    state = regs(orig_rax=READ, rax=neg(sigframe.ERESTARTSYS), r15=0xF15, rbx=0xB, eflags=0x202)
    frame = sigframe.build(state, xstate=xstate(), sigmask=0x4001, at=at, pretcode=0xAB_CDEF)
    assert len(frame) == sigframe.frame_size(1088) == 448 + 1088 + 4
    assert struct.unpack_from("<Q", frame, 0)[0] == 0xAB_CDEF
    assert struct.unpack_from("<Q", frame, 8)[0] == 0x7  # UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS
    assert struct.unpack_from("<i", frame, 8 + 24)[0] == sigframe.SS_FLAGS_INVALID
    mcontext = 8 + 40
    gregs = struct.unpack_from("<18Q", frame, mcontext)
    names = ("r8 r9 r10 r11 r12 r13 r14 r15 rdi rsi rbp rbx rdx rax rcx rsp rip eflags").split()
    by_name = dict(zip(names, gregs))
    assert (by_name["r15"], by_name["rbx"], by_name["rdi"]) == (0xF15, 0xB, 3)
    assert (by_name["rip"], by_name["rax"], by_name["rsp"], by_name["eflags"]) == (0x401000, READ, state.rsp, 0x202)
    cs, _, _, ss = struct.unpack_from("<4H", frame, mcontext + 144)
    assert (cs, ss) == (0x33, 0x2B)
    fpstate = struct.unpack_from("<Q", frame, mcontext + 144 + 8 + 32)[0]
    assert fpstate == at + 448 and fpstate % 64 == 0
    assert struct.unpack_from("<Q", frame, 8 + 296)[0] == 0x4001
    area = frame[448:]
    magic1, extended, features, size = struct.unpack_from("<IIQI", area, sigframe.SW_BYTES)
    assert (magic1, extended, features, size) == (sigframe.FP_XSTATE_MAGIC1, 1092, 0x7, 1088)
    assert struct.unpack_from("<I", area, 1088)[0] == sigframe.FP_XSTATE_MAGIC2
    assert area[160:176] == bytes(range(16)) and struct.unpack_from("<I", area, 24)[0] == 0x1F80


#: A CPU with AVX-512 and AMX, as CPUID leaf 0xD describes it (the development machine's).
AMX_LAYOUT = {2: (576, 256), 5: (1088, 64), 6: (1152, 512), 7: (1664, 1024), 9: (2688, 8), 17: (2752, 64),
              18: (2816, 8192)}
AMX_XCR0 = 0x602E7


def amx_xstate(in_use: int) -> bytes:
    """What PTRACE_GETREGSET gives there: 11,008 bytes, AMX tile data included."""
    area = bytearray(11008)
    struct.pack_into("<Q", area, sigframe.SW_BYTES, AMX_XCR0)
    struct.pack_into("<Q", area, 512, in_use)
    area[576:592] = bytes(range(1, 17))  # ymm0's upper half
    return bytes(area)


def test_an_area_with_amx_tiles_is_cut_to_what_the_thread_uses():
    """rt_sigreturn restores an area larger than the thread's signal frame size (no AMX
    permission: 2,816 bytes there) as x87/SSE only, resetting AVX: the kill-install
    trials saw the ymm registers of a borrowed thread change before this cut."""
    fitted = sigframe.fit(amx_xstate(0x2A6), AMX_LAYOUT)  # SSE, AVX, opmask, Hi16_ZMM, PKRU in use
    assert len(fitted) == 2696  # the end of PKRU, the last feature in use
    assert fitted[576:592] == bytes(range(1, 17))
    assert sigframe.xfeatures_of(fitted) == 0x2E7  # what the cut area holds: no AMX
    frame = sigframe.build(regs(), xstate=fitted, sigmask=0, at=0x7FFF_0000_0000, pretcode=0)
    magic1, extended, features, size = struct.unpack_from("<IIQI", frame[448:], sigframe.SW_BYTES)
    assert (magic1, extended, features, size) == (sigframe.FP_XSTATE_MAGIC1, 2700, 0x2E7, 2696)


def test_a_thread_using_amx_keeps_its_tiles_and_a_legacy_one_gets_the_legacy_area():
    assert len(sigframe.fit(amx_xstate(0x40003), AMX_LAYOUT)) == 11008
    legacy = sigframe.fit(amx_xstate(0x3), AMX_LAYOUT)
    assert (len(legacy), sigframe.xfeatures_of(legacy)) == (576, 0x3)
    with pytest.raises(ValueError):  # a feature in use that the area lacks
        sigframe.fit(amx_xstate(0x40003)[:2816], AMX_LAYOUT)


def test_this_cpus_layout_fits_what_ptrace_gives():
    """The layout read from CPUID: every feature's area inside the standard-format area."""
    from textpoke.target import _ptrace

    layout = sigframe.xsave_layout()
    assert layout.get(2, (576, 256)) == (576, 256)  # AVX, where the CPU has it, right after the header
    assert all(offset >= 576 and size > 0 for offset, size in layout.values())
    # EBX: the size XSAVE needs for every feature the OS enabled (XCR0)
    assert max([576] + [offset + size for offset, size in layout.values()]) == _ptrace.cpuid(0xD, 0)[1]


def test_frame_goes_below_the_red_zone_aligned():
    rsp = 0x7FFF_0000_1238
    size = sigframe.frame_size(2696)
    at = sigframe.place(rsp, size)
    assert at % 64 == 0 and at + size <= rsp - sigframe.RED_ZONE and at + size + 64 > rsp - sigframe.RED_ZONE


def test_a_too_small_xsave_area_is_refused():
    with pytest.raises(ValueError):
        sigframe.build(regs(), xstate=bytes(512), sigmask=0, at=0, pretcode=0)


class FakeProcess:
    def __init__(self, memory: dict[int, bytes]) -> None:
        self.memory = memory

    def read(self, address: int, size: int) -> bytes:
        return self.memory[address][:size]


@pytest.mark.parametrize("rip, expected", [(0x5000, 0x6000), (0x5010, 0x6000), (0x5020, 0x5020), (0x4FFF, 0x4FFF)])
def test_a_thread_stopped_inside_an_rseq_critical_section_resumes_at_its_abort_handler(monkeypatch, rip, expected):
    area, descriptor = 0x9000, 0xA000
    monkeypatch.setattr(inject._ptrace, "rseq_configuration", lambda tid: (area, 32, 0x53053053))
    process = FakeProcess({area + 8: struct.pack("<Q", descriptor),
                           descriptor: struct.pack("<IIQQQ", 0, 0, 0x5000, 0x20, 0x6000)})
    assert inject.rseq_resume_point(process, 1, regs(rip=rip)).rip == expected


def test_no_rseq_critical_section_means_no_change(monkeypatch):
    monkeypatch.setattr(inject._ptrace, "rseq_configuration", lambda tid: (0x9000, 32, 0))
    process = FakeProcess({0x9008: bytes(8)})
    assert inject.rseq_resume_point(process, 1, regs(rip=0x5000)) == regs(rip=0x5000)
