"""textpoke: patch and trace calls in running x86-64 Linux processes, exactly.

The public surface is this module; everything else is private to the package::

    import textpoke

    with textpoke.attach(pid) as session:              # change sites, exactly
        session.apply([textpoke.Patch(site=s, old=old, new=textpoke.encode_call(s, b))])

    with textpoke.attach(pid) as session:              # a live hot-fix: it stays after the session
        textpoke.apply_fix(session, "fix.c")            # (textpoke.revert_fix, textpoke.list_fixes)

    textpoke.capture_pid(pid, textpoke.CaptureOptions(functions=("parse_*",), duration=5),
                         output="run.tpk")              # trace into a recording file
    with textpoke.Recording.load("run.tpk") as recording:
        for chunk in recording.chunks():                # numpy arrays of records
            ...

Every error is a :class:`TextpokeError` (one tree, each with an exit status
and a hint). The library names load on first use, so ``import textpoke`` (and
the CLI's start-up) does not import numpy, iced-x86 or pyelftools.
"""

from __future__ import annotations

from ._errors import (
    BusyError,
    ElfError,
    FixRefused,
    ForeignTrap,
    InjectionError,
    NoSuchProcess,
    NotABoundary,
    NotAUserProcess,
    OwnCodeRefused,
    PatchError,
    PermissionDenied,
    RecordingFailed,
    SiteError,
    SiteMismatch,
    SymbolNotFound,
    TargetError,
    TargetExited,
    TargetReplaced,
    TargetStopped,
    TextpokeError,
    UnsafeTarget,
    UsageError,
)
from ._lazy import lazy_attributes

#: The library's names, and the private module each one comes from.
_LAZY = {
    "attach": ".poke",
    "Patch": ".poke",
    "BatchResult": ".poke",
    "encode_call": ".x86",
    "encode_jmp": ".x86",
    "CaptureOptions": ".capture",
    "Overflow": ".capture",
    "capture_pid": ".capture",
    "capture_command": ".capture",
    "Recording": ".ring",
    "RecordKind": ".ring",
    "RECORD_DTYPE": ".ring",
    "apply_fix": ".hotfix",
    "revert_fix": ".hotfix",
    "list_fixes": ".hotfix",
    "load_fix": ".hotfix",
}


__getattr__ = lazy_attributes(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "BusyError", "ElfError", "FixRefused", "ForeignTrap", "InjectionError", "NoSuchProcess", "NotABoundary", "NotAUserProcess",
    "OwnCodeRefused", "PatchError", "PermissionDenied", "RecordingFailed", "SiteError", "SiteMismatch",
    "SymbolNotFound", "TargetError", "TargetExited", "TargetReplaced", "TargetStopped", "TextpokeError",
    "UnsafeTarget", "UsageError", *_LAZY,
]
