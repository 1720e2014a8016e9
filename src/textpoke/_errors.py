"""The one error tree of textpoke.

Every failure a user can meet is a :class:`TextpokeError` carrying a message (what
is wrong), a hint (what to do) and an exit code; the CLI prints the first two on
one line each and exits with the third.  OS errors are translated into these at
the boundary where they happen (``raise ... from exc``), never leaked raw.
"""

from __future__ import annotations


class TextpokeError(Exception):
    """Root of all textpoke errors."""

    exit_code: int = 1
    default_hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint


class UsageError(TextpokeError):
    """The command line or an API argument is wrong."""

    exit_code = 2


class TargetError(TextpokeError):
    """The target process cannot be used."""

    exit_code = 3


class NoSuchProcess(TargetError):
    exit_code = 3
    default_hint = "check the pid with `ps -p PID`; the process may have exited"


class PermissionDenied(TargetError):
    exit_code = 4
    default_hint = "run textpoke as the target's user or as root (CAP_SYS_PTRACE)"


class TargetExited(TargetError):
    exit_code = 3
    default_hint = "the target exited while textpoke worked on it; nothing is left to undo"


class InjectionError(TargetError):
    """Running code inside the target (ptrace injection, the resident agent) failed."""

    exit_code = 8


class ElfError(TextpokeError):
    """A binary cannot be read or is not one textpoke can patch."""

    exit_code = 6


class SiteError(TextpokeError):
    """A site was refused: nothing was written."""

    exit_code = 5


class SiteMismatch(SiteError):
    # Its own code: the code changed under us (retry after listing the sites
    # again), unlike the other SiteErrors, which no retry will fix.
    exit_code = 11
    default_hint = "the code changed since the sites were found; list the sites again"


class ForeignTrap(SiteMismatch):
    """Sites hold an int3 that is not textpoke's (a debugger's breakpoint, a uprobe's):
    ``sites`` lists them; nothing was written."""

    default_hint = ("remove the breakpoints there (gdb, uprobes), or leave those sites out "
                    "(Session.apply(..., skip_foreign=True) does)")

    def __init__(self, message: str, *, sites: tuple[int, ...] = (), hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.sites = sites


class NotABoundary(SiteError):
    default_hint = "give the address of an instruction start (see `textpoke sites`)"


class PatchError(TextpokeError):
    """A batch could not be applied."""

    exit_code = 7


class BusyError(TargetError):
    """Another textpoke session owns the target."""

    exit_code = 9
    default_hint = "wait for the other session to end, or end it"


class NotAUserProcess(TargetError):
    """The pid has no user-space code to patch (a zombie, a kernel thread)."""

    exit_code = 10


class TargetReplaced(TargetExited):
    """The target executed a new program (exec) while textpoke worked on it."""

    default_hint = "nothing of textpoke survives an exec; attach to the new program if you want to patch it"


class TargetStopped(TargetError):
    """The target is stopped (SIGSTOP, SIGTSTP, a debugger) and textpoke needs it running."""

    exit_code = 14
    default_hint = "continue it (kill -CONT PID); sites left in flight are handled by the resident handler"


class UnsafeTarget(TargetError):
    """Patching now could kill the target (a thread blocks SIGTRAP, ...): refused."""

    exit_code = 13


class SymbolNotFound(TextpokeError):
    """A function name, glob or symbol given by the user matches nothing (or the binary is stripped)."""

    exit_code = 12
    default_hint = "list the functions and sites with `textpoke sites PID`"


class RecordingFailed(TextpokeError):
    """The recording file could not be written (disk full, I/O error): tracing
    stopped, every site was restored, and what was written is kept."""

    exit_code = 15


class OwnCodeRefused(SiteError):
    """The address lies inside textpoke's own code or data in the target."""

    default_hint = "give a site in the program's own code; textpoke never patches itself"


class FixRefused(TextpokeError):
    """A hot-fix textpoke cannot load correctly (TLS, a constructor, a relocation type
    it does not handle, code out of reach): refused before anything is written."""

    exit_code = 16
    default_hint = "build the fix as plain C: gcc -O2 -fPIC -c fix.c (no TLS, no constructors)"


__all__ = [
    "TextpokeError",
    "UsageError",
    "TargetError",
    "NoSuchProcess",
    "PermissionDenied",
    "TargetExited",
    "InjectionError",
    "ElfError",
    "SiteError",
    "SiteMismatch",
    "ForeignTrap",
    "NotABoundary",
    "PatchError",
    "BusyError",
    "NotAUserProcess",
    "TargetReplaced",
    "TargetStopped",
    "UnsafeTarget",
    "SymbolNotFound",
    "OwnCodeRefused",
    "RecordingFailed",
    "FixRefused",
]
