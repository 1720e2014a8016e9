"""Fixtures for the model's tests: machines and worlds that are always closed."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from textpoke.model.isa import Isa
from textpoke.model.kernel import INITIAL_SITE_STATE, EntryFlavor, build_kernel
from textpoke.model.machine import Machine
from textpoke.model.scheduler import ModelConfig, World


@pytest.fixture
def make_machine() -> Iterator[Callable[..., Machine]]:
    """``make_machine(isa, entry, ncpus=1, flush_code=True)``: a reset machine."""
    made: list[Machine] = []

    def make(isa: Isa, entry: EntryFlavor, *, ncpus: int = 1, flush_code: bool = True) -> Machine:
        kernel = build_kernel(isa, entry)
        machine = Machine(kernel, ncpus=ncpus, flush_code=flush_code)
        made.append(machine)
        machine.reset(kernel.initial_memory(ncpus, INITIAL_SITE_STATE))
        return machine

    yield make
    for machine in made:
        machine.close()


@pytest.fixture
def make_world() -> Iterator[Callable[..., World]]:
    """``make_world(**ModelConfig fields)``: a World, closed after the test."""
    made: list[World] = []

    def make(**fields: object) -> World:
        world = World(ModelConfig(**fields))  # type: ignore[arg-type]
        made.append(world)
        return world

    yield make
    for world in made:
        world.machine.close()
