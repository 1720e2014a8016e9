"""Chaos tests: the target survives whatever textpoke does or suffers.

Trial counts come from the environment, small by default so that CI runs the
whole directory in minutes; run them locally at full size with e.g.
``TEXTPOKE_CHAOS_TRIALS=200 TEXTPOKE_CHAOS_CYCLES=1000 pytest tests/chaos``.
"""

from __future__ import annotations

import pytest

from .harness import Target


@pytest.fixture
def life(build_target):
    """``life(*args)`` starts tests/targets/life.c; every target is killed after the test."""
    binary = build_target("life")
    started: list[Target] = []

    def start(*args: str) -> Target:
        target = Target([str(binary), *args])
        started.append(target)
        return target

    start.binary = binary  # type: ignore[attr-defined]
    yield start
    for target in started:
        target.kill()


@pytest.fixture
def hotfix_target(build_target):
    """``hotfix_target(threads=4)`` starts tests/targets/hotfix_target.c (compute has a bug);
    every target is killed after the test."""
    binary = build_target("hotfix_target")
    started: list[Target] = []

    def start(threads: int = 4) -> Target:
        target = Target([str(binary), str(threads)])
        started.append(target)
        return target

    start.binary = binary  # type: ignore[attr-defined]
    yield start
    for target in started:
        target.kill()
