"""The kernel's int3 patching path on emulated x86-64 and x86-32 CPUs (docs/design.md).

N unicorn CPUs share one memory holding a small kernel text: a traced function
whose first instruction is a 5-byte fentry site, ``ftrace_caller`` /
``ftrace_regs_caller`` with their callback call sites, two callbacks that log
``(cpu, function, parent)``, a caller loop per CPU, and the int3 entry code of
the variant under test (all machine code, built with iced-x86).  A patcher runs
the int3 / sync / tail / sync / head / sync protocol on those sites while a
scheduler interleaves it with the CPUs instruction by instruction, and every
step is checked (see :mod:`textpoke.model.checks`).

Modelling choices:

- the trap is delivered in a unicorn interrupt hook that fires when a CPU
  *executes* int3, pushing exactly the hardware frame (x86-64: rsp aligned down
  to 16, then ss, rsp, rflags, cs, rip; x86-32: eflags, cs, eip only);
- the handler (``do_int3`` and below) is Python run when a CPU reaches the
  ``do_int3`` address, reading and writing ``pt_regs`` in emulated memory; the
  entry stubs, the gap copy, the frame switch and ``iret`` are machine code;
- sync completes when every CPU that was inside the int3 path at the write has
  executed ``iret`` (the IPI waits for interrupts to be re-enabled); CPUs outside
  it serialize at once (:mod:`textpoke.model.patcher`);
- variants that do not exist on an ISA run their analogue
  (:mod:`textpoke.model.variants`).

Entry points: :func:`run_model` with a :class:`ModelConfig`, returning a
:class:`Report`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
from .names import Arch, Variant

if TYPE_CHECKING:
    from .checks import SiteStats, Violation, ViolationKind
    from .patcher import CYCLE, Patch, SitePhase
    from .scheduler import Failure, ModelConfig, Report, Run, RunResult, World, run_model
    from .trace import TraceEvent, format_trace
    from .variants import VariantSpec, spec_for

# The machinery (unicorn, iced-x86) loads on first use of one of its names, so
# that ``textpoke --help`` and ``textpoke model --help`` start fast.
_LAZY = {
    "SiteStats": "checks", "Violation": "checks", "ViolationKind": "checks",
    "CYCLE": "patcher", "Patch": "patcher", "SitePhase": "patcher",
    "Failure": "scheduler", "ModelConfig": "scheduler", "Report": "scheduler", "Run": "scheduler",
    "RunResult": "scheduler", "World": "scheduler", "run_model": "scheduler",
    "TraceEvent": "trace", "format_trace": "trace",
    "VariantSpec": "variants", "spec_for": "variants",
}


__getattr__ = lazy_attributes(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CYCLE",
    "Arch",
    "Failure",
    "ModelConfig",
    "Patch",
    "Report",
    "Run",
    "RunResult",
    "SitePhase",
    "SiteStats",
    "TraceEvent",
    "Variant",
    "VariantSpec",
    "Violation",
    "ViolationKind",
    "World",
    "format_trace",
    "run_model",
    "spec_for",
]
