"""Chaos tests: the target survives whatever textpoke does or suffers.

Trial counts come from the environment, small by default so that CI runs the
whole directory in minutes; run them locally at full size with e.g.
``TEXTPOKE_CHAOS_TRIALS=200 TEXTPOKE_CHAOS_CYCLES=1000 pytest tests/chaos``.
"""

from __future__ import annotations

import pytest

from .harness import Target


class _Started:
    """``start(*args)`` starts ``binary`` with ``args``; :meth:`kill_all` after the test."""

    def __init__(self, binary) -> None:
        self.binary = binary
        self._targets: list[Target] = []

    def __call__(self, *args: str) -> Target:
        target = Target([str(self.binary), *args])
        self._targets.append(target)
        return target

    def kill_all(self) -> None:
        for target in self._targets:
            target.kill()


class _HotfixTargets(_Started):
    def __call__(self, threads: int = 4) -> Target:  # type: ignore[override]
        return super().__call__(str(threads))


@pytest.fixture
def life(build_target):
    """``life(*args)`` starts tests/targets/life.c; every target is killed after the test."""
    started = _Started(build_target("life"))
    yield started
    started.kill_all()


@pytest.fixture
def hotfix_target(build_target):
    """``hotfix_target(threads=4)`` starts tests/targets/hotfix_target.c (compute has a bug);
    every target is killed after the test."""
    started = _HotfixTargets(build_target("hotfix_target"))
    yield started
    started.kill_all()
