"""The designs the model runs: the 2019 int3 call emulation as proposed and as
merged, and the designs that must fail.

The history, which the variant names follow: in May 2019 the int3 handler of
ftrace and text_poke_bp learned to emulate the call being patched instead of
skipping it. On x86-64 the int3 entry code opens a gap below the trap frame for
the emulated push; that was merged as proposed (Linux 5.2, ``int3_emulate_call``).
On x86-32 a same-privilege trap frame has no sp/ss, and the proposal was for the
handler to move the saved registers down a word and return the moved frame to
the entry code; that was not merged: Linux 5.4 made x86-32 kernel trap frames
complete instead ("x86/stackframe/32: Provide consistent pt_regs"), so the
generic push works there too.

- ``proposed``: the 2019 proposal (x86-64: gap; x86-32: moved, returned frame);
- ``merged``: what Linux runs (x86-64: the same gap; x86-32: complete frames);
- ``no-gap``, ``skip``, ``notifier``, ``no-int3``: what goes wrong without one
  part of the design.

A variant is a combination of entry code, handler and ``int3_emulate_push``
(plus, for ``no-int3``, the patch protocol).  Every variant runs on both ISAs;
where the named design does not exist on an ISA the model runs its meaningful
analogue instead of refusing, and says so in :attr:`VariantSpec.summary`:

- ``no-gap`` on x86-32: there is no gap to leave out; the analogue is the
  generic ``regs->sp`` push on the entry code from before 2019, where the frame
  is truncated and ``regs->sp`` aliases the interrupted stack's top word;
- ``notifier`` on x86-64: the frame never has to move (the gap holds the push),
  so a handler that cannot return a frame still works -- the variant passes,
  which is the point;
- ``merged`` on x86-64 is ``proposed`` (the x86-64 part was merged as is).
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import ViolationKind
from .handler import HandlerFlavor, PushFlavor
from .isa import Arch
from .kernel import EntryFlavor
from .names import Variant
from .patcher import Protocol


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

_add(Variant.PROPOSED, _X, _E.GAP, _H.EMULATE, _P.REGS_SP, None,
     "as proposed in 2019 and merged (Linux 5.2): the int3 entry copies the frame down 6 words (a gap), "
     "the handler emulates the call into the gap")
_add(Variant.PROPOSED, _I, _E.RETURNED_FRAME, _H.EMULATE, _P.MOVE_FRAME, None,
     "as proposed in 2019, not merged: the handler moves the truncated frame down a word and returns it; "
     "the entry switches to it (movl %eax,%esp)")
_add(Variant.NO_GAP, _X, _E.NO_GAP, _H.EMULATE, _P.REGS_SP, _K.CORRUPT_FRAME,
     "no gap: pt_regs sits on the hardware frame, the emulated push overwrites the frame's ss")
_add(Variant.NO_GAP, _I, _E.PLAIN, _H.EMULATE, _P.REGS_SP, _K.LIVE_STACK_OVERWRITTEN,
     "analogue of no-gap: the generic regs->sp push on a truncated frame, whose sp field "
     "is the interrupted stack's top word")
_add(Variant.SKIP, _X, _E.GAP, _H.SKIP, _P.REGS_SP, _K.LOST_CALL,
     "before 2019: the handler skips the site, so call A -> call B loses calls")
_add(Variant.SKIP, _I, _E.RETURNED_FRAME, _H.SKIP, _P.MOVE_FRAME, _K.LOST_CALL,
     "before 2019: the handler skips the site, so call A -> call B loses calls")
_add(Variant.NOTIFIER, _X, _E.GAP, _H.EMULATE, _P.REGS_SP, None,
     "analogue of notifier: x86-64 never moves the frame, so a handler that cannot return "
     "one still emulates the call (passes)")
_add(Variant.NOTIFIER, _I, _E.DISCARDED_FRAME, _H.EMULATE, _P.MOVE_FRAME, _K.CORRUPT_FRAME,
     "notifier: the handler moves the frame but cannot return it; the entry restores from "
     "the old place and resumes on a corrupt stack")
_add(Variant.MERGED, _X, _E.GAP, _H.EMULATE, _P.REGS_SP, None,
     "merged (Linux 5.2): on x86-64 the same gap as proposed")
_add(Variant.MERGED, _I, _E.COMPLETE_FRAME, _H.EMULATE, _P.REGS_SP, None,
     "merged (Linux 5.4): entry completes the frame (sp, ss) below a gap, exit rebuilds the iret "
     "frame under regs->sp; the generic push works")
_add(Variant.NO_INT3, _X, _E.GAP, _H.EMULATE, _P.REGS_SP, _K.TORN_INSN,
     "no int3: tail then head written directly, CPUs fetch torn instructions", Protocol.DIRECT)
_add(Variant.NO_INT3, _I, _E.RETURNED_FRAME, _H.EMULATE, _P.MOVE_FRAME, _K.TORN_INSN,
     "no int3: tail then head written directly, CPUs fetch torn instructions", Protocol.DIRECT)


def spec_for(variant: Variant, arch: Arch) -> VariantSpec:
    return _SPECS[variant, arch]
