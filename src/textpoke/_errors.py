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
    default_hint = "the code changed since the sites were found; list the sites again"


class NotABoundary(SiteError):
    default_hint = "give the address of an instruction start (see `textpoke sites`)"


class PatchError(TextpokeError):
    """A batch could not be applied."""

    exit_code = 7


class BusyError(TargetError):
    """Another textpoke session owns the target."""

    exit_code = 9
    default_hint = "wait for the other session to end, or end it"


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
    "NotABoundary",
    "PatchError",
    "BusyError",
]
