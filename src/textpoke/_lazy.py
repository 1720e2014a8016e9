"""Attributes a package loads from its submodules on first use (PEP 562), so that
importing it stays cheap: ``textpoke`` without numpy, ``textpoke.model`` without
unicorn, ``textpoke.report`` without the reporters a capture never prints."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, table: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``name`` comes from the submodule
    ``table[name]`` (``"ring"`` or ``".ring"``), imported when first asked for, then
    kept in ``namespace`` (the package's globals) so later lookups do not come back."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module if module.startswith(".") else f".{module}", package), name)
        namespace[name] = value
        return value

    return __getattr__
