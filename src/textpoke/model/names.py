"""The names a user picks the model's run by (``--arch``, ``--variant``), apart from
the machinery, so that the CLI can offer them without loading unicorn."""

from __future__ import annotations

import enum


class Arch(enum.Enum):
    """Which kernel the model runs."""

    X86_64 = "x86_64"
    I386 = "i386"


class Variant(enum.Enum):
    """The design under test (see :mod:`textpoke.model.variants`)."""

    PROPOSED = "proposed"
    NO_GAP = "no-gap"
    SKIP = "skip"
    NOTIFIER = "notifier"
    MERGED = "merged"
    NO_INT3 = "no-int3"


__all__ = ["Arch", "Variant"]
