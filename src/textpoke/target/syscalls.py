"""x86-64 Linux syscall numbers and flags used when running syscalls in a target."""

from __future__ import annotations

from typing import Protocol

SYS_read = 0
SYS_write = 1
SYS_close = 3
SYS_fstat = 5
SYS_poll = 7
SYS_pread64 = 17
SYS_pwrite64 = 18
SYS_mmap = 9
SYS_mprotect = 10
SYS_munmap = 11
SYS_rt_sigaction = 13
SYS_rt_sigprocmask = 14
SYS_rt_sigreturn = 15
SYS_getpid = 39
SYS_kill = 62
SYS_clone = 56
SYS_exit = 60
SYS_prctl = 157
SYS_ftruncate = 77
SYS_fchmod = 91
SYS_gettid = 186
SYS_futex = 202
SYS_tgkill = 234
SYS_membarrier = 324
SYS_memfd_create = 319
SYS_openat = 257
SYS_pidfd_open = 434
SYS_madvise = 28
SYS_sched_setattr = 314

AT_FDCWD = -100
O_RDWR = 2
O_CLOEXEC = 0o2000000
STAT_INO = 8  # struct stat: st_dev (u64), then st_ino (u64)
STAT_SIZE = 144

PROT_READ = 1
PROT_WRITE = 2
PROT_EXEC = 4
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_FIXED_NOREPLACE = 0x100000

MFD_CLOEXEC = 1
PR_SET_NAME = 15

SIGTRAP = 5
SIG_BLOCK = 0
SIG_SETMASK = 2
SA_SIGINFO = 0x4
SA_RESTORER = 0x04000000
SA_RESTART = 0x10000000
SA_NODEFER = 0x40000000
SI_KERNEL = 0x80

CLONE_VM = 0x100
CLONE_FS = 0x200
CLONE_FILES = 0x400
CLONE_SIGHAND = 0x800
CLONE_THREAD = 0x10000
CLONE_SYSVSEM = 0x40000
#: A thread of the target, as pthread_create makes one (minus TLS and tid words).
CLONE_THREAD_FLAGS = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM

MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE = 1 << 5
MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE = 1 << 6

#: Syscalls a thread may be blocked in and be interrupted by a ptrace stop
#: without the program noticing: they return -ERESTART* and are restarted
#: (or resume through restart_syscall). epoll_wait, sigtimedwait and friends
#: return EINTR after any stop, so their threads are never borrowed.
TRANSPARENT_RESTART = frozenset(
    {
        0,  # read
        1,  # write
        7,  # poll
        17,  # pread64
        18,  # pwrite64
        19,  # readv
        20,  # writev
        23,  # select
        34,  # pause
        35,  # nanosleep
        43,  # accept
        44,  # sendto
        45,  # recvfrom
        46,  # sendmsg
        47,  # recvmsg
        61,  # wait4
        202,  # futex
        230,  # clock_nanosleep
        247,  # waitid
        270,  # pselect6
        271,  # ppoll
        288,  # accept4
    }
)


#: Syscalls that return EINTR (not -ERESTART*) when a ptrace stop wakes them,
#: and that did nothing when they return it: issuing them again is what the
#: thread would have done had it not been woken (it only waits, perhaps longer
#: for a finite timeout). man 7 signal lists them as never restarted.
REISSUE_AFTER_EINTR = frozenset(
    {
        65,  # semop
        128,  # rt_sigtimedwait
        208,  # io_getevents
        220,  # semtimedop
        232,  # epoll_wait
        281,  # epoll_pwait
        441,  # epoll_pwait2
    }
)


class SyscallRunner(Protocol):
    """Something that runs a syscall inside the target and returns its result."""

    def syscall(self, nr: int, *args: int) -> int: ...
