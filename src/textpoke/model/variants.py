"""The designs the model runs: the seed, and the ones that must fail.

A variant is a combination of entry code, handler and ``int3_emulate_push``
(plus, for ``no-int3``, the patch protocol).  Every variant runs on both ISAs;
where the named design does not exist on an ISA the model runs its meaningful
analogue instead of refusing, and says so in :attr:`VariantSpec.summary`:

- ``no-gap`` on x86-32: there is no gap to leave out; the analogue is the same
  generic ``regs->sp`` push on the entry code before the seed, where the frame is
  truncated and ``regs->sp`` aliases the interrupted stack's top word;
- ``notifier`` on x86-64: the frame never has to move (the gap holds the push),
  so a handler that cannot return a frame still works -- the variant passes,
  which is the point;
- ``merged`` on x86-64 is the seed (the x86-64 part was merged as is).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .checks import ViolationKind
from .handler import HandlerFlavor, PushFlavor
from .isa import Arch
from .kernel import EntryFlavor
from .patcher import Protocol


class Variant(enum.Enum):
    SEED = "seed"
    NO_GAP = "no-gap"
    SKIP = "skip"
    NOTIFIER = "notifier"
    MERGED = "merged"
    NO_INT3 = "no-int3"


@dataclass(frozen=True)
class VariantSpec:
    """How one variant is built on one ISA, and how it is expected to end."""

    variant: Variant
    arch: Arch
    entry: EntryFlavor
    handler: HandlerFlavor
    push: PushFlavor
    protocol: Protocol
    #: The violation the variant must produce, or None if it must pass.
    expect: ViolationKind | None
    summary: str


_E, _H, _P, _K = EntryFlavor, HandlerFlavor, PushFlavor, ViolationKind

_SPECS: dict[tuple[Variant, Arch], VariantSpec] = {}


def _add(variant: Variant, arch: Arch, entry: EntryFlavor, handler: HandlerFlavor, push: PushFlavor,
         expect: ViolationKind | None, summary: str, protocol: Protocol = Protocol.INT3) -> None:
    _SPECS[variant, arch] = VariantSpec(variant, arch, entry, handler, push, protocol, expect, summary)


_X, _I = Arch.X86_64, Arch.I386

_add(Variant.SEED, _X, _E.GAP, _H.EMULATE, _P.REGS_SP, None,
     "the seed: entry copies the frame down 6 words (gap), handler emulates the call into the gap")
_add(Variant.SEED, _I, _E.RETURNED_FRAME, _H.EMULATE, _P.MOVE_FRAME, None,
     "the seed: handler moves the truncated frame down a word and returns it; entry does movl %eax,%esp")
_add(Variant.NO_GAP, _X, _E.NO_GAP, _H.EMULATE, _P.REGS_SP, _K.CORRUPT_FRAME,
     "no gap: pt_regs sits on the hardware frame, the emulated push overwrites the frame's ss")
_add(Variant.NO_GAP, _I, _E.PLAIN, _H.EMULATE, _P.REGS_SP, _K.LIVE_STACK_OVERWRITTEN,
     "analogue of no-gap: the generic regs->sp push on a truncated frame, whose sp field "
     "is the interrupted stack's top word")
_add(Variant.SKIP, _X, _E.GAP, _H.SKIP, _P.REGS_SP, _K.LOST_CALL,
     "before the seed: the handler skips the site, so call A -> call B loses calls")
_add(Variant.SKIP, _I, _E.RETURNED_FRAME, _H.SKIP, _P.MOVE_FRAME, _K.LOST_CALL,
     "before the seed: the handler skips the site, so call A -> call B loses calls")
_add(Variant.NOTIFIER, _X, _E.GAP, _H.EMULATE, _P.REGS_SP, None,
     "analogue of notifier: x86-64 never moves the frame, so a handler that cannot return "
     "one still emulates the call (passes)")
_add(Variant.NOTIFIER, _I, _E.DISCARDED_FRAME, _H.EMULATE, _P.MOVE_FRAME, _K.CORRUPT_FRAME,
     "notifier: the handler moves the frame but cannot return it; the entry restores from "
     "the old place and resumes on a corrupt stack")
_add(Variant.MERGED, _X, _E.GAP, _H.EMULATE, _P.REGS_SP, None,
     "merged = the seed on x86-64")
_add(Variant.MERGED, _I, _E.COMPLETE_FRAME, _H.EMULATE, _P.REGS_SP, None,
     "merged later: entry completes the frame (sp, ss) below a gap, exit rebuilds the iret "
     "frame under regs->sp; the generic push works")
_add(Variant.NO_INT3, _X, _E.GAP, _H.EMULATE, _P.REGS_SP, _K.TORN_INSN,
     "no int3: tail then head written directly, CPUs fetch torn instructions", Protocol.DIRECT)
_add(Variant.NO_INT3, _I, _E.RETURNED_FRAME, _H.EMULATE, _P.MOVE_FRAME, _K.TORN_INSN,
     "no int3: tail then head written directly, CPUs fetch torn instructions", Protocol.DIRECT)


def spec_for(variant: Variant, arch: Arch) -> VariantSpec:
    return _SPECS[variant, arch]
