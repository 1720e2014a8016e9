from __future__ import annotations

import pytest

from .harness import start, symbols


@pytest.fixture
def hammer(build_target):
    """A running 4-thread hammer target and its symbols; killed after the test."""
    binary = build_target("hammer")
    running = start(binary, "4")
    yield running, symbols(binary), binary
    running.kill()
