"""apply_batch: the three-sync protocol over a fake process, step by step."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from textpoke import ForeignTrap, PatchError, SiteError, SiteMismatch, UsageError
from textpoke.poke.protocol import (
    BatchResult,
    Patch,
    Step,
    apply_batch,
    revert_patches,
)
from textpoke.poke.spec import SI_KERNEL, Emulated, TrapFrame, handle_int3
from textpoke.poke.table import SiteTable
from textpoke.x86.insn import INT3, INT3_BYTE, NOP5, decode_site, encode_call, encode_jmp

from .fakes import (
    BASE,
    TEXT_SIZE,
    THREAD_SP,
    BatchWritingText,
    FakeSync,
    FakeText,
    Scenario,
    TableSpy,
    new_table,
    reference_effect,
    scenarios,
)

ALL_STEPS = [Step.VERIFIED, Step.PUBLISHED, Step.INT3, Step.TAIL, Step.HEAD]


def fixed_scenario() -> Scenario:
    """call A -> call B, nop -> call (adjacent to the first), jmp -> nop."""
    a, b, c = BASE + 0x10, BASE + 0x15, BASE + 0x40
    patches = (
        Patch(site=a, old=encode_call(a, 0x40_8000), new=encode_call(a, 0x40_9000)),
        Patch(site=b, old=NOP5, new=encode_call(b, 0x40_9000)),
        Patch(site=c, old=encode_jmp(c, 0x40_0000), new=NOP5),
    )
    original = bytearray(b"\x90" * TEXT_SIZE)
    for p in patches:
        original[p.site - BASE : p.site - BASE + 5] = p.old
    return Scenario(original=bytes(original), patches=patches)


def execute(text: FakeText, table: object, site: int) -> Emulated:
    """What a thread arriving at ``site`` now does: run the bytes, or trap."""
    current = text.at(site)
    if current[0] == INT3_BYTE:
        result = handle_int3(TrapFrame(ip=site + 1, sp=THREAD_SP, si_code=SI_KERNEL), table)  # type: ignore[arg-type]
        assert isinstance(result, Emulated), f"int3 at {site:#x} that nothing handles"
        return result
    decode_site(site, current)  # a whole nop5/call/jmp, or SiteError: torn
    return reference_effect(site, current, sp=THREAD_SP)


def effects(patch: Patch) -> tuple[Emulated, Emulated]:
    return (
        reference_effect(patch.site, patch.old, sp=THREAD_SP),
        reference_effect(patch.site, patch.new, sp=THREAD_SP),
    )


def assert_old_or_new(text: FakeText, table: object, patches: tuple[Patch, ...]) -> None:
    for patch in patches:
        assert execute(text, table, patch.site) in effects(patch)


# --- Patch and revert -------------------------------------------------------


def test_patch_validation() -> None:
    site = BASE
    call = encode_call(site, 0x40_8000)
    with pytest.raises(UsageError, match="old has 4 bytes"):
        Patch(site=site, old=call[:4], new=NOP5)
    with pytest.raises(UsageError, match="new has 6 bytes"):
        Patch(site=site, old=NOP5, new=call + b"\x00")
    with pytest.raises(UsageError, match="must be bytes"):
        Patch(site=site, old="0f1f440000", new=NOP5)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="not a valid address"):
        Patch(site=0, old=NOP5, new=NOP5)
    with pytest.raises(UsageError, match="not a valid address"):
        Patch(site=2**64 - 4, old=NOP5, new=NOP5)
    with pytest.raises(SiteError, match="not nop5, call rel32 or jmp rel32"):
        Patch(site=site, old=NOP5, new=bytes(5))
    with pytest.raises(SiteError):
        Patch(site=site, old=INT3 + call[1:], new=NOP5)
    patch = Patch(site=site, old=bytearray(call), new=NOP5)  # type: ignore[arg-type]
    assert type(patch.old) is bytes and patch.old == call
    with pytest.raises(dataclasses.FrozenInstanceError):
        patch.new = call  # type: ignore[misc]


def test_revert_patches_swaps_old_and_new_in_order() -> None:
    scenario = fixed_scenario()
    reverted = revert_patches(scenario.patches)
    assert reverted == [Patch(site=p.site, old=p.new, new=p.old) for p in scenario.patches]
    assert revert_patches(reverted) == list(scenario.patches)


# --- the batch, whole -------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(scenario=scenarios())
def test_apply_batch_writes_new_with_three_syncs(scenario: Scenario) -> None:
    text, sync, table = scenario.text(), FakeSync(), new_table(64)
    steps: list[Step] = []
    result = apply_batch(scenario.patches, text=text, sync=sync, table=table, on_step=steps.append)
    assert bytes(text.memory) == scenario.image_after()
    changed = tuple(p.site for p in scenario.patches if p.old != p.new)
    same = tuple(p.site for p in scenario.patches if p.old == p.new)
    assert result == BatchResult(patched=changed, skipped=same, syncs=3 if changed else 0)
    assert sync.calls == result.syncs
    assert steps == (ALL_STEPS if changed else [Step.VERIFIED])
    assert table.as_dict() == {p.site: p.new for p in scenario.patches if p.old != p.new}
    # Only the sites were written: int3, tail, head, one write each.
    assert len(text.log) == 3 * len(changed)


@settings(max_examples=100, deadline=None)
@given(scenario=scenarios(min_sites=1))
def test_every_step_and_every_write_leaves_old_or_new(scenario: Scenario) -> None:
    table = new_table(64)
    checks: list[Step] = []
    text = scenario.text()
    text.after_write = lambda: assert_old_or_new(text, table, scenario.patches)
    late_traps: list[tuple[Patch, TrapFrame]] = []

    def on_step(step: Step) -> None:
        checks.append(step)
        for patch in scenario.patches:
            current = text.at(patch.site)
            ran = execute(text, table, patch.site)
            old_effect, new_effect = effects(patch)
            if patch.old == patch.new:
                assert current == patch.old and ran == old_effect
            elif step in (Step.VERIFIED, Step.PUBLISHED):
                assert current == patch.old and ran == old_effect
                expected_entry = patch.new if step is Step.PUBLISHED else None
                assert table.lookup(patch.site) == expected_entry
            elif step is Step.INT3:
                assert current == INT3 + patch.old[1:]
                assert ran == new_effect  # the new instruction is emulated
                late_traps.append((patch, TrapFrame(patch.site + 1, THREAD_SP, SI_KERNEL)))
            elif step is Step.TAIL:
                assert current == INT3 + patch.new[1:]
                assert ran == new_effect
            else:
                assert current == patch.new and ran == new_effect

    apply_batch(scenario.patches, text=text, sync=FakeSync(), table=table, on_step=on_step)
    changed = any(p.old != p.new for p in scenario.patches)
    assert checks == (ALL_STEPS if changed else [Step.VERIFIED])
    # Traps taken at the int3 step but handled only now still find their entry.
    for patch, frame in late_traps:
        assert handle_int3(frame, table) == effects(patch)[1]


@settings(max_examples=100, deadline=None)
@given(scenario=scenarios())
def test_revert_restores_the_bytes_exactly(scenario: Scenario) -> None:
    text, sync, table = scenario.text(), FakeSync(), new_table(64)
    apply_batch(scenario.patches, text=text, sync=sync, table=table)
    result = apply_batch(revert_patches(scenario.patches), text=text, sync=sync, table=table)
    assert bytes(text.memory) == scenario.original
    changed = tuple(p.site for p in scenario.patches if p.old != p.new)
    assert result.patched == changed
    assert sync.calls == (6 if changed else 0)
    # The entries stay, and now hold each site's (original) instruction.
    assert table.as_dict() == {p.site: p.old for p in scenario.patches if p.old != p.new}


@settings(max_examples=100, deadline=None)
@given(scenario=scenarios(min_sites=1), data=st.data())
def test_a_mismatch_anywhere_writes_nothing(scenario: Scenario, data: st.DataObject) -> None:
    victim = data.draw(st.sampled_from(scenario.patches))
    # The victim's site holds something else than expected: another call.
    other = encode_call(victim.site, 0x7_0000 + data.draw(st.integers(0, 2**16)))
    if other == victim.old:
        other = encode_jmp(victim.site, 0x7_0000)
    text = scenario.text()
    text.memory[victim.site - BASE : victim.site - BASE + 5] = other
    before = bytes(text.memory)
    sync, table, steps = FakeSync(), new_table(64), []
    with pytest.raises(SiteMismatch, match=f"{victim.site:#x} holds {other.hex(' ')}"):
        apply_batch(scenario.patches, text=text, sync=sync, table=table, on_step=steps.append)
    assert bytes(text.memory) == before
    assert text.log == []
    assert (sync.calls, len(table), steps) == (0, 0, [])


# --- step 0 refusals --------------------------------------------------------


def test_every_mismatching_site_is_reported() -> None:
    scenario = fixed_scenario()
    text = scenario.text()
    for patch in scenario.patches[:2]:
        text.memory[patch.site - BASE : patch.site - BASE + 5] = patch.new
    with pytest.raises(SiteMismatch, match="2 of 3 sites") as info:
        apply_batch(scenario.patches, text=text, sync=FakeSync(), table=new_table())
    for patch in scenario.patches[:2]:
        assert f"{patch.site:#x}" in str(info.value)
    assert f"{scenario.patches[2].site:#x}" not in str(info.value)
    assert info.value.hint is not None


def test_a_foreign_int3_is_refused() -> None:
    scenario = fixed_scenario()
    text = scenario.text()
    site = scenario.patches[1].site
    text.memory[site - BASE] = INT3_BYTE  # a debugger's breakpoint
    before = bytes(text.memory)
    table = new_table()
    with pytest.raises(ForeignTrap, match=f"1 of 3 sites hold an int3 that is not textpoke's .*: {site:#x}") as info:
        apply_batch(scenario.patches, text=text, sync=FakeSync(), table=table)
    assert info.value.sites == (site,) and isinstance(info.value, SiteMismatch)
    assert bytes(text.memory) == before and len(table) == 0


def test_a_foreign_int3_is_skipped_on_request() -> None:
    """skip_foreign: the other sites are patched, the foreign one is named and untouched."""
    scenario = fixed_scenario()
    text = scenario.text()
    site = scenario.patches[1].site
    text.memory[site - BASE] = INT3_BYTE
    foreign_bytes = bytes(text.memory[site - BASE : site - BASE + 5])
    table = new_table()
    result = apply_batch(scenario.patches, text=text, sync=FakeSync(), table=table, skip_foreign=True)
    assert result.foreign == (site,) and site not in result.patched and len(result.patched) == 2
    assert bytes(text.memory[site - BASE : site - BASE + 5]) == foreign_bytes and site not in table


def test_an_in_flight_site_to_something_else_is_refused() -> None:
    scenario = fixed_scenario()
    text, table = scenario.text(), new_table()
    site = scenario.patches[0].site
    stranger = encode_call(site, 0x41_0000)
    table.publish(site, stranger)
    text.memory[site - BASE] = INT3_BYTE
    before = bytes(text.memory)
    with pytest.raises(SiteMismatch, match=f"{site:#x} is in flight to {stranger.hex(' ')}"):
        apply_batch(scenario.patches, text=text, sync=FakeSync(), table=table)
    assert bytes(text.memory) == before
    assert table.as_dict() == {site: stranger}


@pytest.mark.parametrize("distance", [0, 1, 2, 3, 4])
def test_overlapping_patches_are_refused(distance: int) -> None:
    a, b = BASE + 0x20, BASE + 0x20 + distance
    data = bytearray(TEXT_SIZE)
    data[0x20:0x25] = NOP5
    text = FakeText(BASE, data)
    patches = [Patch(site=a, old=NOP5, new=encode_call(a, BASE)), Patch(site=b, old=NOP5, new=NOP5)]
    with pytest.raises(SiteError, match=f"patches at {a:#x} and {b:#x} overlap"):
        apply_batch(patches, text=text, sync=FakeSync(), table=new_table())
    assert bytes(text.memory) == bytes(data) and text.reads == 0


def test_a_batch_too_big_for_the_table_writes_and_publishes_nothing() -> None:
    scenario = fixed_scenario()
    text, sync = scenario.text(), FakeSync()
    table = new_table(4)  # room for 3, one taken
    table.publish(BASE + 0x200, NOP5)
    with pytest.raises(PatchError, match="room for 2 more sites, this batch needs 3"):
        apply_batch(scenario.patches, text=text, sync=sync, table=table)
    assert bytes(text.memory) == scenario.original
    assert table.as_dict() == {BASE + 0x200: NOP5}
    assert sync.calls == 0


def test_only_patches_are_accepted() -> None:
    with pytest.raises(UsageError, match="Patch values, not tuple"):
        apply_batch([(BASE, NOP5, NOP5)], text=FakeText(BASE, bytes(64)), sync=FakeSync(), table=new_table())  # type: ignore[list-item]


def test_empty_batch_does_nothing() -> None:
    text, sync, steps = FakeText(BASE, bytes(64)), FakeSync(), []
    result = apply_batch([], text=text, sync=sync, table=new_table(), on_step=steps.append)
    assert result == BatchResult(patched=(), skipped=(), syncs=0)
    assert (sync.calls, text.log, text.reads, steps) == (0, [], 0, [Step.VERIFIED])


# --- order and batching -----------------------------------------------------


def test_exact_order_of_publishes_writes_and_syncs() -> None:
    scenario = fixed_scenario()
    log: list[tuple[str, int, bytes]] = []
    text = scenario.text(log=log)
    table = TableSpy(new_table(), log)
    sync = FakeSync(log=log)
    apply_batch(scenario.patches, text=text, sync=sync, table=table)
    ps = scenario.patches
    assert log == [
        *[("publish", p.site, p.new) for p in ps],
        *[("write", p.site, INT3) for p in ps],
        ("sync", 0, b""),
        *[("write", p.site + 1, p.new[1:]) for p in ps],
        ("sync", 0, b""),
        *[("write", p.site, p.new[:1]) for p in ps],
        ("sync", 0, b""),
    ]


def test_write_many_gets_each_step_in_one_call() -> None:
    scenario = fixed_scenario()
    text = BatchWritingText(BASE, scenario.original)
    apply_batch(scenario.patches, text=text, sync=FakeSync(), table=new_table())
    ps = scenario.patches
    assert text.write_many_calls == [
        [(p.site, INT3) for p in ps],
        [(p.site + 1, p.new[1:]) for p in ps],
        [(p.site, p.new[:1]) for p in ps],
    ]
    assert bytes(text.memory) == scenario.image_after()


def test_nearby_sites_are_read_together() -> None:
    scenario = fixed_scenario()  # sites at +0x10, +0x15, +0x40: within the read gap
    text = scenario.text()
    apply_batch(scenario.patches, text=text, sync=FakeSync(), table=new_table())
    assert text.reads == 4  # verify + three read-backs, one read each


# --- failures ---------------------------------------------------------------


@pytest.mark.parametrize("failing", [0, 1, 2])
def test_a_failed_int3_write_is_rolled_back(failing: int) -> None:
    scenario = fixed_scenario()
    bad_site = scenario.patches[failing].site
    text = scenario.text(fail_write=lambda addr, data: addr == bad_site and data == INT3)
    sync, table, steps = FakeSync(), new_table(), []
    with pytest.raises(OSError, match=f"injected write failure at {bad_site:#x}"):
        apply_batch(scenario.patches, text=text, sync=sync, table=table, on_step=steps.append)
    assert bytes(text.memory) == scenario.original
    assert sync.calls == 1  # the rollback's sync
    assert steps == [Step.VERIFIED, Step.PUBLISHED]
    # Restored in order: the first bytes replaced before the failure, and the failed one.
    restores = [(p.site, p.old[:1]) for p in scenario.patches[: failing + 1]]
    assert [(a, d) for kind, a, d in text.log if d != INT3] == restores
    assert table.as_dict() == {p.site: p.old for p in scenario.patches}
    # And the batch can simply be applied again.
    text.fail_write = None
    apply_batch(scenario.patches, text=text, sync=sync, table=table)
    assert bytes(text.memory) == scenario.image_after()


def test_an_int3_read_back_mismatch_is_rolled_back() -> None:
    scenario = fixed_scenario()
    victim = scenario.patches[2].site

    class Ignoring(FakeText):
        """Someone else puts the byte back right after our int3 write."""

        def write(self, addr: int, data: bytes) -> None:
            super().write(addr, data)
            if addr == victim and data == INT3:
                self.memory[addr - BASE] = scenario.patches[2].old[0]

    text = Ignoring(BASE, scenario.original)
    sync = FakeSync()
    with pytest.raises(PatchError, match=f"site {victim:#x} reads back .* after writing int3"):
        apply_batch(scenario.patches, text=text, sync=sync, table=new_table())
    assert bytes(text.memory) == scenario.original
    assert sync.calls == 1


def test_a_failed_int3_sync_is_rolled_back() -> None:
    scenario = fixed_scenario()
    text = scenario.text()

    def failing_once() -> None:
        if sync.calls == 1:
            raise PatchError("membarrier failed")

    sync = FakeSync(hook=failing_once)
    with pytest.raises(PatchError, match="membarrier failed"):
        apply_batch(scenario.patches, text=text, sync=sync, table=new_table())
    assert bytes(text.memory) == scenario.original
    assert sync.calls == 2


def test_a_tail_read_back_mismatch_names_the_site() -> None:
    scenario = fixed_scenario()
    victim = scenario.patches[1]

    class Clobbering(FakeText):
        def write(self, addr: int, data: bytes) -> None:
            super().write(addr, data)
            if addr == victim.site + 1:
                self.memory[addr - BASE] ^= 0xFF

    text = Clobbering(BASE, scenario.original)
    with pytest.raises(PatchError, match=f"site {victim.site:#x} reads back .* after writing tail"):
        apply_batch(scenario.patches, text=text, sync=FakeSync(), table=new_table())


def _complete(
    scenario: Scenario, text: FakeText, table: SiteTable, how: str, *, resume: bool = False
) -> None:
    """Finish an interrupted batch by applying it again or its revert."""
    patches = scenario.patches if how == "reapply" else tuple(revert_patches(scenario.patches))
    pending = [p.site for p in patches if text.at(p.site) != p.new]
    had_entry = {p.site for p in patches if p.site in table}
    result = apply_batch(patches, text=text, sync=FakeSync(), table=table, resume=resume)
    assert result.patched == tuple(pending)
    assert result.syncs == (3 if pending else 0)
    expected = scenario.image_after() if how == "reapply" else scenario.original
    assert bytes(text.memory) == expected
    # Written sites gained an entry; every entry holds what its site now holds.
    assert table.as_dict() == {p.site: p.new for p in patches if p.site in had_entry | set(pending)}


@pytest.mark.parametrize("how", ["reapply", "revert"])
@pytest.mark.parametrize("what", ["tail", "head"])
@pytest.mark.parametrize("failing", [0, 1, 2])
def test_a_failure_after_the_int3s_leaves_the_new_behaviour_and_completes(
    how: str, what: str, failing: int
) -> None:
    scenario = fixed_scenario()
    bad = scenario.patches[failing]
    # Fail the write of the new tail, or of the new first byte (not the int3).
    bad_write = (bad.site + 1, bad.new[1:]) if what == "tail" else (bad.site, bad.new[:1])
    text = scenario.text(fail_write=lambda addr, data: (addr, data) == bad_write)
    table = new_table()
    with pytest.raises(OSError):
        apply_batch(scenario.patches, text=text, sync=FakeSync(), table=table)
    # Not rolled back: every site behaves as the new instruction.
    for patch in scenario.patches:
        assert execute(text, table, patch.site) == effects(patch)[1]
    assert text.at(bad.site)[0] == INT3_BYTE
    text.fail_write = None
    # Sites completed before a head failure hold `new`: a strict re-apply refuses.
    strict_ok = how == "revert" or what == "tail" or failing == 0
    if strict_ok:
        _complete(scenario, text, table, how)
    else:
        with pytest.raises(SiteMismatch, match=f"{scenario.patches[0].site:#x} holds"):
            apply_batch(scenario.patches, text=text, sync=FakeSync(), table=table)
        _complete(scenario, text, table, how, resume=True)


@pytest.mark.parametrize(
    ("step", "how", "strict_ok"),
    [
        (Step.VERIFIED, "reapply", True),
        (Step.VERIFIED, "revert", False),
        (Step.PUBLISHED, "reapply", True),
        (Step.PUBLISHED, "revert", False),
        (Step.INT3, "reapply", True),
        (Step.INT3, "revert", True),
        (Step.TAIL, "reapply", True),
        (Step.TAIL, "revert", True),
        (Step.HEAD, "reapply", False),
        (Step.HEAD, "revert", True),
    ],
)
def test_killed_at_any_step_then_completed(step: Step, how: str, strict_ok: bool) -> None:
    """The tool dies at ``step``: the target still runs old or new everywhere;
    the batch or its revert finishes the job strictly where every site still
    holds its `old`, and with resume=True always."""
    scenario = fixed_scenario()
    text, table = scenario.text(), new_table()

    class Killed(Exception):
        pass

    def die(at: Step) -> None:
        if at is step:
            raise Killed

    with pytest.raises(Killed):
        apply_batch(scenario.patches, text=text, sync=FakeSync(), table=table, on_step=die)
    assert_old_or_new(text, table, scenario.patches)
    if strict_ok:
        _complete(scenario, text, table, how)
        return
    before = bytes(text.memory)
    patches = scenario.patches if how == "reapply" else revert_patches(scenario.patches)
    with pytest.raises(SiteMismatch):
        apply_batch(patches, text=text, sync=FakeSync(), table=table)
    assert bytes(text.memory) == before
    _complete(scenario, text, table, how, resume=True)


def test_resume_puts_a_stale_entry_right() -> None:
    """Killed after publishing, then reverted: no site was touched, and the
    entries the dead batch published go back to what the sites hold."""
    scenario = fixed_scenario()
    text, table = scenario.text(), new_table()

    def die(at: Step) -> None:
        if at is Step.PUBLISHED:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        apply_batch(scenario.patches, text=text, sync=FakeSync(), table=table, on_step=die)
    assert table.as_dict() == {p.site: p.new for p in scenario.patches}
    sync = FakeSync()
    result = apply_batch(
        revert_patches(scenario.patches), text=text, sync=sync, table=table, resume=True
    )
    assert result == BatchResult(
        patched=(), skipped=tuple(p.site for p in scenario.patches), syncs=0
    )
    assert (sync.calls, text.log) == (0, [])
    assert table.as_dict() == {p.site: p.old for p in scenario.patches}


def test_resume_still_refuses_foreign_bytes() -> None:
    scenario = fixed_scenario()
    text = scenario.text()
    site = scenario.patches[2].site
    text.memory[site - BASE : site - BASE + 5] = encode_call(site, 0x40_5000)
    with pytest.raises(SiteMismatch, match=f"1 of 3 sites.*{site:#x} holds e8"):
        apply_batch(scenario.patches, text=text, sync=FakeSync(), table=new_table(), resume=True)


# --- speed --------------------------------------------------------------------


class FileText:
    """Text in a file at offset ``addr - base``, one pread/pwrite syscall per access
    (what /proc/PID/mem costs)."""

    def __init__(self, fd: int, base: int) -> None:
        self.fd, self.base = fd, base

    def read(self, addr: int, n: int) -> bytes:
        return os.pread(self.fd, n, addr - self.base)

    def write(self, addr: int, data: bytes) -> None:
        os.pwrite(self.fd, data, addr - self.base)


def test_ten_thousand_sites_take_under_a_second() -> None:
    count, spacing = 10_000, 80  # 80 > the read gap: every read is its own syscall
    sites = [BASE + spacing * i for i in range(count)]
    patches = [Patch(site=s, old=NOP5, new=encode_call(s, BASE + 0x10_0000)) for s in sites]
    image = bytearray(spacing * count)
    for s in sites:
        image[s - BASE : s - BASE + 5] = NOP5
    table = SiteTable(bytearray(SiteTable.size_for(16384)), capacity=16384)
    with tempfile.TemporaryFile() as handle:
        handle.write(image)
        handle.flush()
        text = FileText(handle.fileno(), BASE)
        sync = FakeSync()
        start = time.perf_counter()
        result = apply_batch(patches, text=text, sync=sync, table=table)
        elapsed = time.perf_counter() - start
        handle.seek(0)
        final = handle.read()
    assert result.syncs == 3 and len(result.patched) == count
    for s in sites[:: count // 50]:
        assert final[s - BASE : s - BASE + 5] == encode_call(s, BASE + 0x10_0000)
    assert elapsed < 1.0, f"{count} sites took {elapsed:.2f} s"
