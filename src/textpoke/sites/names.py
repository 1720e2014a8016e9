"""Function names as people write them: demangled C++ names, and globs over them.

A C++ function has three names here: the symbol (``_ZN2ns3Foo3barEi``), the
demangled one shown in every output (``ns::Foo::bar(int)``), and a short one
without return type and parameters (``ns::Foo::bar``).  A glob given with
``-f`` or ``--calls-to`` matches any of them, so ``ns::Foo::*``,
``ns::Foo::bar`` and ``_ZN2ns3Foo*`` all select that function.

Demangling uses libstdc++'s ``__cxa_demangle`` through ctypes
(:func:`textpoke.target._ptrace.demangle_many`): about 2 us a name, the same as
one bulk ``c++filt`` run (42 ms and 45 ms for 23,564 libstdc++ symbols), without a
process to start or binutils to require; only names starting with ``_Z`` are
passed to it.  Without libstdc++ names stay mangled (globs on them still work).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Collection, Sequence

from ..target._ptrace import demangle_many

_QUALIFIERS = (" const", " volatile", " &&", " &", " noexcept")
_GLOB_CHARS = frozenset("*?[")


def is_mangled(name: str) -> bool:
    return name.startswith("_Z")


def demangle_all(names: Sequence[str]) -> list[str]:
    """``names`` with every C++ symbol demangled (others, and failures, as they are);
    ``names`` itself when it is a list without C++ symbols."""
    todo = [i for i, name in enumerate(names) if name.startswith("_Z")]
    if not todo:
        return names if isinstance(names, list) else list(names)
    out = list(names)
    done = demangle_many([out[i] for i in todo])
    if done is not None:
        for i, name in zip(todo, done):
            out[i] = name
    return out


def short_name(name: str) -> str:
    """``ns::Foo::bar`` for ``int ns::Foo::bar<int>(int) const [clone .cold]``.

    Drops clone suffixes, cv/ref qualifiers, the parameter list (the
    parenthesis matching the last one) and a template function's return type
    (text before the last space outside ``<>``/``()``, never inside an
    ``operator`` name).  Plain C names come back unchanged.
    """
    text = name
    while text.endswith("]") and " [clone " in text:
        text = text[: text.rindex(" [clone ")]
    stripped = True
    while stripped:
        stripped = False
        for qualifier in _QUALIFIERS:
            if text.endswith(qualifier):
                text = text[: -len(qualifier)]
                stripped = True
    if text.endswith(")"):
        depth = 0
        for i in range(len(text) - 1, -1, -1):
            char = text[i]
            if char == ")":
                depth += 1
            elif char == "(":
                depth -= 1
                if depth == 0:
                    if i > 0:
                        text = text[:i]
                    break
    depth = 0
    cut = -1
    i = 0
    while i < len(text):
        if text.startswith("operator", i) and (i == 0 or text[i - 1] in ": "):
            break  # the rest (operator<, operator(), operator bool) is the name itself
        char = text[i]
        if char in "<({":
            depth += 1
        elif char in ">)}":
            depth -= 1
        elif char == " " and depth == 0:
            cut = i
        i += 1
    return text[cut + 1 :]


_ENDS_IN_OPERATOR = re.compile(r"operator\s*(?:->|>>=|>>|>=|>)$")


def short_names(name: str) -> tuple[str, ...]:
    """The names a glob may use for demangled ``name`` besides itself: the short
    name (:func:`short_name`) and, for a template instance, the short name
    without its template arguments (``ns::add`` for ``ns::add<int>``)."""
    short = short_name(name)
    out = [short]
    if short.endswith(">") and not _ENDS_IN_OPERATOR.search(short):
        depth = 0
        for i in range(len(short) - 1, -1, -1):
            if short[i] == ">":
                depth += 1
            elif short[i] == "<":
                depth -= 1
                if depth == 0:
                    if i > 0:
                        out.append(short[:i].rstrip())
                    break
    return tuple(n for n in dict.fromkeys(out) if n != name)


def is_glob(pattern: str) -> bool:
    return bool(_GLOB_CHARS & set(pattern))


def compile_glob(globs: Sequence[str]) -> Callable[[str], bool] | None:
    """A predicate "this one name matches one of ``globs``" (case-sensitive), or None."""
    if not globs:
        return None
    pattern = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))
    match = pattern.match
    return lambda name: match(name) is not None


def compile_globs(globs: Sequence[str]) -> Callable[[Collection[str]], bool] | None:
    """A predicate "any of these names matches any glob" (case-sensitive), or None."""
    single = compile_glob(globs)
    if single is None:
        return None
    return lambda names: any(single(name) for name in names)


__all__ = ["compile_glob", "compile_globs", "demangle_all", "is_glob", "is_mangled", "short_name", "short_names"]
