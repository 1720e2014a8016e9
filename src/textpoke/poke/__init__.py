"""poke: the batch protocol, its in-flight table, the trap handler and its resident code."""

from .protocol import BatchResult, Patch, Step, apply_batch, revert_patches
from .recover import Recovery, Restore, recover
from .resident import Resident, ResidentStats
from .session import Session, attach, spawn
from .spec import NOT_OURS, Emulated, TrapFrame, handle_int3

__all__ = [
    "BatchResult",
    "Emulated",
    "NOT_OURS",
    "Patch",
    "Recovery",
    "Resident",
    "ResidentStats",
    "Restore",
    "Session",
    "Step",
    "TrapFrame",
    "apply_batch",
    "attach",
    "spawn",
    "handle_int3",
    "recover",
    "revert_patches",
]
