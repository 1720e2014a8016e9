"""The libc binding: ptrace, waitpid on threads, futex.  The only ctypes user.

Each call raises ``OSError`` with the real errno; callers one level up translate
it into a textpoke error with advice (they know what was being attempted).
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
from typing import NamedTuple

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long

PTRACE_TRACEME = 0
PTRACE_PEEKUSER = 3
PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_SYSCALL = 24
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETSIGINFO = 0x4202
PTRACE_GETREGSET = 0x4204
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
NT_X86_XSTATE = 0x202
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_EXITKILL = 0x100000
SYSCALL_STOP = 0x80 | 5  # WSTOPSIG of a syscall-stop with TRACESYSGOOD (SIGTRAP | 0x80)

WALL = 0x40000000  # __WALL: wait for clone children (threads) too

SYS_futex = 202
SYS_tgkill = 234
FUTEX_WAIT = 0
FUTEX_WAKE = 1


class _UserRegs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_ulonglong)
        for name in (
            "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax "
            "rip cs eflags rsp ss fs_base gs_base ds es fs gs"
        ).split()
    ]


class Regs(NamedTuple):
    """x86-64 ``user_regs_struct`` as a value (unsigned 64-bit fields).

    A named tuple rather than a frozen dataclass: a borrow copies registers a
    dozen times while a thread is stopped, and this is 10x cheaper to build."""

    r15: int
    r14: int
    r13: int
    r12: int
    rbp: int
    rbx: int
    r11: int
    r10: int
    r9: int
    r8: int
    rax: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    orig_rax: int
    rip: int
    cs: int
    eflags: int
    rsp: int
    ss: int
    fs_base: int
    gs_base: int
    ds: int
    es: int
    fs: int
    gs: int


_REG_NAMES = Regs._fields
_REGS_FORMAT = struct.Struct(f"<{len(_REG_NAMES)}Q")


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def ptrace(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    ctypes.set_errno(0)
    return _check(_libc.ptrace(request, tid, ctypes.c_void_p(addr), ctypes.c_void_p(data)), "ptrace")


def seize(tid: int, *, options: int = 0) -> None:
    ptrace(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    ptrace(PTRACE_INTERRUPT, tid)


def cont(tid: int, sig: int = 0) -> None:
    ptrace(PTRACE_CONT, tid, 0, sig)


def singlestep(tid: int, sig: int = 0) -> None:
    ptrace(PTRACE_SINGLESTEP, tid, 0, sig)


def syscall(tid: int, sig: int = 0) -> None:
    """Resume until the next syscall entry or exit (PTRACE_SYSCALL)."""
    ptrace(PTRACE_SYSCALL, tid, 0, sig)


def set_options(tid: int, options: int) -> None:
    ptrace(PTRACE_SETOPTIONS, tid, 0, options)


def tgkill(pid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to one thread of another process."""
    ctypes.set_errno(0)
    _check(_libc.syscall(ctypes.c_long(SYS_tgkill), ctypes.c_int(pid), ctypes.c_int(tid), ctypes.c_int(sig)),
           "tgkill")


def detach(tid: int, sig: int = 0) -> None:
    ptrace(PTRACE_DETACH, tid, 0, sig)


def traceme() -> None:
    ptrace(PTRACE_TRACEME, 0)


def get_regs(tid: int) -> Regs:
    raw = _UserRegs()
    ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(raw))
    return Regs._make(_REGS_FORMAT.unpack(bytes(raw)))


def set_regs(tid: int, regs: Regs) -> None:
    raw = _UserRegs.from_buffer_copy(_REGS_FORMAT.pack(*(value & 0xFFFF_FFFF_FFFF_FFFF for value in regs)))
    ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(raw))


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def get_xstate(tid: int) -> bytes:
    """The thread's XSAVE area (standard format, the kernel's user size): x87,
    SSE, AVX... state, as a signal frame would carry it."""
    buf = _xstate_buffer()
    iov = _Iovec(ctypes.addressof(buf), len(buf))
    ptrace(PTRACE_GETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(iov))
    return ctypes.string_at(buf, iov.len)


@functools.cache
def _xstate_buffer() -> ctypes.Array:
    return ctypes.create_string_buffer(1 << 16)  # XSAVE areas are under 12 KiB, even with AMX


def get_siginfo_code(tid: int) -> int:
    """``si_code`` of the signal a thread in a signal-delivery-stop is about to get
    (SI_KERNEL for an int3's trap; SI_USER, SI_TKILL... for a sent one)."""
    info = ctypes.create_string_buffer(128)  # siginfo_t: si_signo, si_errno, si_code (ints)
    ptrace(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(info))
    return struct.unpack_from("<i", info.raw, 8)[0]


def get_sigmask(tid: int) -> int:
    """The thread's blocked-signal mask (bit ``sig - 1`` per signal)."""
    mask = ctypes.c_uint64()
    ptrace(PTRACE_GETSIGMASK, tid, 8, ctypes.addressof(mask))
    return mask.value


def set_sigmask(tid: int, mask: int) -> None:
    raw = ctypes.c_uint64(mask & 0xFFFF_FFFF_FFFF_FFFF)
    ptrace(PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(raw))


class _RseqConfiguration(ctypes.Structure):
    _fields_ = [("pointer", ctypes.c_uint64), ("size", ctypes.c_uint32), ("signature", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def rseq_configuration(tid: int) -> tuple[int, int, int]:
    """(rseq area address, its size, its signature) the thread registered; address 0: none."""
    raw = _RseqConfiguration()
    ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, ctypes.sizeof(raw), ctypes.addressof(raw))
    return raw.pointer, raw.size, raw.signature


def wait_thread(tid: int, *, nohang: bool = False) -> tuple[int, int]:
    """``waitpid(tid, __WALL)``: (tid, raw status); (0, 0) with ``nohang`` and nothing yet."""
    flags = WALL | (os.WNOHANG if nohang else 0)
    while True:
        try:
            return os.waitpid(tid, flags)
        except InterruptedError:
            continue


def buffer_address(buffer: object, offset: int = 0) -> int:
    """Address of ``buffer[offset]`` in this process (for futex on shared memory)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer, offset))  # type: ignore[arg-type]


def futex_wait(address: int, expected: int, timeout_s: float | None) -> None:
    """Sleep while the u32 at ``address`` equals ``expected`` (shared, not PRIVATE)."""
    ts = None
    if timeout_s is not None:
        sec = int(timeout_s)

        class _Timespec(ctypes.Structure):
            _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

        ts = _Timespec(sec, int((timeout_s - sec) * 1e9))
    ctypes.set_errno(0)
    result = _libc.syscall(
        ctypes.c_long(SYS_futex),
        ctypes.c_void_p(address),
        ctypes.c_int(FUTEX_WAIT),
        ctypes.c_uint(expected & 0xFFFF_FFFF),
        ctypes.byref(ts) if ts is not None else ctypes.c_void_p(0),
        ctypes.c_void_p(0),
        ctypes.c_int(0),
    )
    if result == -1:
        err = ctypes.get_errno()
        if err not in (11, 4, 110):  # EAGAIN (value changed), EINTR, ETIMEDOUT
            raise OSError(err, f"futex wait: {os.strerror(err)}")


def futex_wake(address: int, count: int = 1) -> int:
    ctypes.set_errno(0)
    return _check(
        _libc.syscall(
            ctypes.c_long(SYS_futex),
            ctypes.c_void_p(address),
            ctypes.c_int(FUTEX_WAKE),
            ctypes.c_int(count),
            ctypes.c_void_p(0),
            ctypes.c_void_p(0),
            ctypes.c_int(0),
        ),
        "futex wake",
    )


# -- the tool's own time stamp counter ------------------------------------------------

import functools as _functools  # noqa: E402  (appended section: keeps the lines above untouched)
import mmap as _mmap  # noqa: E402
from collections.abc import Callable as _Callable  # noqa: E402


@_functools.cache
def _rdtsc_function() -> _Callable[[], int]:
    """``rdtsc; shl rdx, 32; or rax, rdx; ret`` in a page of our own, as a C function."""
    from ..x86.asm import Asm, R  # the leaf stage; imported on first use only

    a = Asm()
    a.op("RDTSC")
    a.op("SHL_RM64_IMM8", R.RDX, 32)
    a.op("OR_RM64_R64", R.RAX, R.RDX)
    a.op("RETNQ")
    return ctypes.CFUNCTYPE(ctypes.c_uint64)(_code_page(a.assemble(0)[0]))


@_functools.cache
def _cmpxchg_function() -> _Callable[[int, int, int], int]:
    """``mov eax, esi; lock cmpxchg [rdi], edx; ret``: (address, expected, new) -> the old value."""
    from ..x86.asm import Asm, R, mem

    a = Asm()
    a.op("MOV_R32_RM32", R.EAX, R.ESI)
    a.op("CMPXCHG_RM32_R32", mem(R.RDI), R.EDX, lock=True)
    a.op("RETNQ")
    return ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32)(
        _code_page(a.assemble(0)[0]))


def cmpxchg_u32(address: int, expected: int, new: int) -> int:
    """Atomically replace the u32 at ``address`` (shared memory) by ``new`` if it
    holds ``expected``; the value it held (== expected: replaced)."""
    return _cmpxchg_function()(address, expected & 0xFFFF_FFFF, new & 0xFFFF_FFFF)


@_functools.cache
def _cpuid_function() -> _Callable[[int, int, int], None]:
    """(leaf, subleaf, out) -> None: ``cpuid`` with eax = leaf, ecx = subleaf, and
    eax, ebx, ecx, edx stored at ``out`` as four u32 (rbx is callee-saved: kept)."""
    from ..x86.asm import Asm, R, mem

    a = Asm()
    a.op("PUSH_R64", R.RBX)
    a.op("MOV_R32_RM32", R.EAX, R.EDI)
    a.op("MOV_R32_RM32", R.ECX, R.ESI)
    a.op("MOV_R64_RM64", R.R8, R.RDX)
    a.op("CPUID")
    for i, reg in enumerate((R.EAX, R.EBX, R.ECX, R.EDX)):
        a.op("MOV_RM32_R32", mem(R.R8, 4 * i), reg)
    a.op("POP_R64", R.RBX)
    a.op("RETNQ")
    return ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(_code_page(a.assemble(0)[0]))


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """This CPU's ``cpuid`` (eax, ebx, ecx, edx) for ``leaf``/``subleaf``."""
    out = (ctypes.c_uint32 * 4)()
    _cpuid_function()(leaf, subleaf, ctypes.addressof(out))
    return out[0], out[1], out[2], out[3]


def _code_page(code: bytes) -> int:
    """``code`` in a page of our own: written while RW, then made RX (never
    writable and executable at once); never unmapped, so a function there stays
    valid for the process's life. The bytes come from the project's assembler."""
    page = _mmap.PAGESIZE
    # Prototypes of our own: the shared _libc attributes keep their defaults.
    mmap_fn = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                               ctypes.c_int, ctypes.c_int, ctypes.c_long, use_errno=True)(("mmap", _libc))
    mprotect_fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                   use_errno=True)(("mprotect", _libc))
    address = mmap_fn(None, page, _mmap.PROT_READ | _mmap.PROT_WRITE, _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS, -1, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap for generated code: {os.strerror(err)}")
    ctypes.memmove(address, code, len(code))
    _check(mprotect_fn(address, page, _mmap.PROT_READ | _mmap.PROT_EXEC), "mprotect for generated code")
    return address


def rdtsc() -> int:
    """This CPU's time stamp counter (the clock textpoke's tracers record)."""
    return _rdtsc_function()()


# -- C++ names ----------------------------------------------------------------------


@_functools.cache
def _cxa_demangle() -> tuple[_Callable[..., int | None], _Callable[[int], None]] | None:
    """libstdc++'s ``__cxa_demangle`` (the C++ runtime's own demangler) and a ``free``
    for what it returns; None when libstdc++ is not installed."""
    try:
        lib = ctypes.CDLL("libstdc++.so.6")
    except OSError:
        return None
    demangle = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.POINTER(ctypes.c_int))(("__cxa_demangle", lib))
    free = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(("free", _libc))
    return demangle, free


def demangle_many(names: list[str]) -> list[str] | None:
    """Each name demangled (``_ZN2ns3fooEi`` -> ``ns::foo(int)``), unchanged where it
    is not a valid mangled name; None if libstdc++ is not there.  About 2 us a name."""
    functions = _cxa_demangle()
    if functions is None:
        return None
    demangle, free = functions
    status = ctypes.c_int()
    status_ref = ctypes.byref(status)
    string_at = ctypes.string_at
    out = []
    for name in names:
        pointer = demangle(name.encode(), None, None, status_ref)
        if pointer:
            out.append(string_at(pointer).decode("utf-8", "replace"))
            free(pointer)
        else:
            out.append(name)
    return out
