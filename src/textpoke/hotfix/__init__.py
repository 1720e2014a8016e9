"""Live hot-fixes: load a fixed function into a running process and redirect every call to it.

loader.py reads and links the fix (textpoke is the linker: nothing runs in the
target), apply.py plans, loads, switches the sites in one batch and keeps the
fix ledger (poke/fixes.py) so that a later textpoke lists, reverts or finishes it.
"""

from __future__ import annotations

from .apply import AppliedFix, FixInfo, PreparedFix, Redirect, hotfix, list_fixes, prepare_fix, revert_fix
from .loader import FIX_CFLAGS, FixFile, Image, build, read_fix

load_fix = prepare_fix  # the library name: check, build and link a fix against a process, writing nothing
#: The library name (``textpoke.apply_fix``): ``textpoke.hotfix`` is this package.
apply_fix = hotfix

__all__ = ["FIX_CFLAGS", "AppliedFix", "apply_fix", "FixFile", "FixInfo", "Image", "PreparedFix", "Redirect", "build", "hotfix",
           "list_fixes", "load_fix", "prepare_fix", "read_fix", "revert_fix"]
