"""The bulk protocol (poke/bulk.py) against the per-site reference (protocol.apply_batch):
the same fake text, table and batch through both must give the same bytes, table,
result, steps, syncs and errors; plus what only the bulk path does (runs, coalesced
writes, the check of the bytes between sites)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from textpoke import ForeignTrap, PatchError, SiteError, SiteMismatch, UsageError
from textpoke.poke.bulk import PatchArray, apply_patches, read_sites
from textpoke.poke.protocol import BatchResult, Patch, Step, apply_batch, revert_patches
from textpoke.poke.table import SiteTable
from textpoke.x86.insn import INT3, INT3_BYTE, NOP5, encode_call, encode_jmp

from .fakes import BASE, TEXT_SIZE, FakeSync, FakeText, Scenario, new_table, scenarios

ALL_STEPS = [Step.VERIFIED, Step.PUBLISHED, Step.INT3, Step.TAIL, Step.HEAD]


def used_slots(table: SiteTable) -> np.ndarray:
    return np.flatnonzero(np.frombuffer(table._q, dtype=np.uint64)[0::2])


def run(impl: str, patches: object, text: FakeText, table: SiteTable, **kwargs: object) -> tuple[object, list, int]:
    """(result or the exception, steps seen, syncs) of one batch through ``impl``."""
    steps: list[Step] = []
    sync = FakeSync()
    apply = apply_batch if impl == "reference" else apply_patches
    try:
        result: object = apply(patches, text=text, sync=sync, table=table, on_step=steps.append, **kwargs)
    except Exception as exc:  # compared by type and message
        result = exc
    return result, steps, sync.calls


def same(a: object, b: object) -> None:
    if isinstance(a, Exception) or isinstance(b, Exception):
        assert type(a) is type(b) and str(a) == str(b), (a, b)
        assert getattr(a, "sites", None) == getattr(b, "sites", None)
    else:
        assert a == b


def assert_same_state(ref: tuple[FakeText, SiteTable], bulk: tuple[FakeText, SiteTable]) -> None:
    assert bytes(bulk[0].memory) == bytes(ref[0].memory)
    assert bulk[1].as_dict() == ref[1].as_dict()
    assert len(bulk[1]) == len(ref[1])
    # Linear probing fills the same slots whatever the order: the handler finds the same.
    assert np.array_equal(used_slots(bulk[1]), used_slots(ref[1]))


def both(scenario: Scenario, *, prepare=None, batches=None, capacity: int = 64, **kwargs: object) -> None:
    """Run the scenario's batches (default: apply, then revert) through both paths and compare."""
    states = {}
    outcomes = {}
    for impl in ("reference", "bulk"):
        text, table = scenario.text(), new_table(capacity)
        if prepare is not None:
            prepare(text, table)
        seen = []
        for patches in batches or (scenario.patches, revert_patches(scenario.patches)):
            seen.append(run(impl, patches, text, table, **kwargs))
        states[impl] = (text, table)
        outcomes[impl] = seen
    for (ra, sa, ca), (rb, sb, cb) in zip(outcomes["reference"], outcomes["bulk"]):
        same(ra, rb)
        assert (sa, ca) == (sb, cb)
    assert_same_state(states["reference"], states["bulk"])


@settings(max_examples=200, deadline=None)
@given(scenario=scenarios(max_sites=24))
def test_bulk_equals_the_reference_apply_and_revert(scenario: Scenario) -> None:
    both(scenario)


@settings(max_examples=100, deadline=None)
@given(scenario=scenarios(min_sites=1, max_sites=24), data=st.data())
def test_bulk_equals_the_reference_on_any_starting_state(scenario: Scenario, data: st.DataObject) -> None:
    """Sites holding old, new, something else, a foreign int3, an int3 in flight to
    old/new/another insn; stale entries; resume and skip_foreign either way."""
    seed = data.draw(st.integers(0, 2**32))
    states = [data.draw(st.sampled_from(["old", "new", "other", "foreign", "flight_old", "flight_new",
                                         "flight_other", "stale"])) for _ in scenario.patches]

    def prepare(text: FakeText, table: SiteTable) -> None:
        rng = random.Random(seed)  # the same state for both paths
        for patch, state in zip(scenario.patches, states):
            at = patch.site - BASE
            other = encode_call(patch.site, 0x7_0000 + rng.randrange(2**16))
            if state == "new":
                text.memory[at : at + 5] = patch.new
            elif state == "other":
                text.memory[at : at + 5] = other
            elif state == "foreign":
                text.memory[at] = INT3_BYTE
            elif state.startswith("flight"):
                table.publish(patch.site, {"flight_old": patch.old, "flight_new": patch.new}.get(state, other))
                text.memory[at] = INT3_BYTE
            elif state == "stale":
                table.publish(patch.site, patch.new)

    resume = data.draw(st.booleans())
    skip = data.draw(st.booleans())
    both(scenario, prepare=prepare, batches=[scenario.patches], resume=resume, skip_foreign=skip)


@settings(max_examples=60, deadline=None)
@given(scenario=scenarios(min_sites=1, max_sites=16), data=st.data())
def test_bulk_equals_the_reference_when_killed_at_any_step_then_completed(scenario: Scenario,
                                                                          data: st.DataObject) -> None:
    step = data.draw(st.sampled_from(ALL_STEPS))
    how = data.draw(st.sampled_from(["reapply", "revert"]))

    class Killed(Exception):
        pass

    results = {}
    for impl in ("reference", "bulk"):
        text, table = scenario.text(), new_table(64)
        apply = apply_batch if impl == "reference" else apply_patches

        def die(at: Step) -> None:
            if at is step:
                raise Killed

        with pytest.raises(Killed) if any(p.old != p.new for p in scenario.patches) or step is Step.VERIFIED \
                else _nothing():
            apply(scenario.patches, text=text, sync=FakeSync(), table=table, on_step=die)
        patches = scenario.patches if how == "reapply" else revert_patches(scenario.patches)
        results[impl] = (run(impl, patches, text, table, resume=True), text, table)
    same(results["reference"][0][0], results["bulk"][0][0])
    assert_same_state(results["reference"][1:], results["bulk"][1:])


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_refusals_are_the_same() -> None:
    a = BASE + 0x20
    data = bytearray(TEXT_SIZE)
    data[0x20:0x25] = NOP5
    for distance in range(5):
        patches = [Patch(site=a, old=NOP5, new=encode_call(a, BASE)), Patch(site=a + distance, old=NOP5, new=NOP5)]
        for impl in ("reference", "bulk"):
            text = FakeText(BASE, data)
            result, steps, syncs = run(impl, patches, text, new_table())
            assert isinstance(result, SiteError) and f"patches at {a:#x} and {a + distance:#x} overlap" in str(result)
            assert text.reads == 0 and steps == [] and syncs == 0
    with pytest.raises(UsageError, match="Patch values, not tuple"):
        apply_patches([(BASE, NOP5, NOP5)], text=FakeText(BASE, bytes(64)), sync=FakeSync(), table=new_table())  # type: ignore[list-item]
    # Table too small: same message, nothing written or published.
    scenario_sites = [BASE + 0x10 * i for i in range(1, 4)]
    patches = [Patch(site=s, old=NOP5, new=encode_call(s, BASE)) for s in scenario_sites]
    image = bytearray(TEXT_SIZE)
    for s in scenario_sites:
        image[s - BASE : s - BASE + 5] = NOP5
    messages = set()
    for impl in ("reference", "bulk"):
        table = new_table(4)
        table.publish(BASE + 0x200, NOP5)
        text = FakeText(BASE, image)
        result, _, syncs = run(impl, patches, text, table)
        assert isinstance(result, PatchError) and syncs == 0 and text.log == []
        messages.add(str(result))
    assert len(messages) == 1


def test_many_mismatches_are_named_alike() -> None:
    sites = [BASE + 8 * i for i in range(20)]
    patches = [Patch(site=s, old=NOP5, new=encode_jmp(s, BASE)) for s in sites]
    image = bytearray(TEXT_SIZE)
    for i, s in enumerate(sites):
        image[s - BASE : s - BASE + 5] = encode_call(s, BASE) if i % 2 else NOP5
    image[sites[4] - BASE] = INT3_BYTE  # and a foreign int3
    results = [run(impl, patches, FakeText(BASE, image), new_table())[0] for impl in ("reference", "bulk")]
    assert isinstance(results[0], SiteMismatch)
    same(*results)
    assert "(and 2 more)" in str(results[0]) and "hold an int3 that is not textpoke's" in str(results[0])
    image[sites[1] - BASE : sites[1] - BASE + 5] = NOP5
    only_foreign = bytearray(image)
    for i, s in enumerate(sites):
        if i % 2:
            only_foreign[s - BASE : s - BASE + 5] = NOP5
    results = [run(impl, patches, FakeText(BASE, only_foreign), new_table())[0] for impl in ("reference", "bulk")]
    assert isinstance(results[0], ForeignTrap)
    same(*results)


# --- what only the bulk path does ------------------------------------------------------------


class CountingText(FakeText):
    def __init__(self, base: int, data: bytes | bytearray) -> None:
        super().__init__(base, data)
        self.writes: list[tuple[int, int]] = []

    def write(self, addr: int, data: bytes) -> None:
        self.writes.append((addr, len(data)))
        super().write(addr, data)


def dense(count: int, spacing: int = 16) -> tuple[bytearray, list[Patch]]:
    sites = [BASE + spacing * i for i in range(count)]
    image = bytearray(random.Random(count).randbytes(spacing * count + 64).replace(INT3, b"\x90"))
    patches = []
    for s in sites:
        image[s - BASE : s - BASE + 5] = NOP5
        patches.append(Patch(site=s, old=NOP5, new=encode_call(s, BASE + 0x10_0000)))
    return image, patches


def test_a_dense_batch_is_one_write_per_step_and_the_bytes_between_sites_stay() -> None:
    image, patches = dense(1000)
    text = CountingText(BASE, image)
    table = SiteTable(bytearray(SiteTable.size_for(2048)), capacity=2048)
    result = apply_patches(patches, text=text, sync=FakeSync(), table=table)
    assert result.syncs == 3 and len(result.patched) == 1000
    last = patches[-1].site
    assert text.writes == [(BASE, last + 1 - BASE), (BASE + 1, last + 4 - BASE), (BASE, last + 1 - BASE)]
    after = bytearray(image)
    for p in patches:
        after[p.site - BASE : p.site - BASE + 5] = p.new
    assert bytes(text.memory) == bytes(after)
    # Verify, then per step: one read before and one after the write of the single run.
    assert text.reads == 1 + 3 * 2


def test_runs_split_where_pages_do_not_touch_and_where_sites_may_not_share() -> None:
    sites = [BASE, BASE + 0x100, BASE + 0x1FF0, BASE + 0x3800, BASE + 0x3900]  # pages 0, 0, 1 | 3, 3
    image = bytearray(0x4000)
    for s in sites:
        image[s - BASE : s - BASE + 5] = NOP5
    patches = [Patch(site=s, old=NOP5, new=encode_call(s, BASE)) for s in sites]
    text = CountingText(BASE, image)
    apply_patches(patches, text=text, sync=FakeSync(), table=new_table(), coalesce=True)
    assert [a for a, _ in text.writes[:2]] == [BASE, BASE + 0x3800]
    text = CountingText(BASE, image)
    alone = np.array([True, True, True, False, True])
    apply_patches(patches, text=text, sync=FakeSync(), table=new_table(), coalesce=alone)
    assert text.writes[:3] == [(BASE, 0x1FF1), (BASE + 0x3800, 1), (BASE + 0x3900, 1)]


def test_code_changed_between_sites_stops_the_batch_and_the_int3s_are_rolled_back() -> None:
    image, patches = dense(50)

    class Meddling(FakeText):
        """Another writer changes a byte between two sites right after verification."""

        def read(self, addr: int, n: int) -> bytes:
            data = super().read(addr, n)
            if self.reads == 1:
                self.memory[patches[10].site - BASE + 7] ^= 0xFF
            return data

    text = Meddling(BASE, image)
    sync, table = FakeSync(), new_table(128)
    with pytest.raises(PatchError, match=f"code at {patches[10].site + 7:#x} changed before int3 was written"):
        apply_patches(patches, text=text, sync=sync, table=table)
    assert sync.calls == 1 and text.log == []  # nothing written; the rollback's sync
    assert table.as_dict() == {p.site: p.old for p in patches}


def test_a_failed_coalesced_int3_write_is_rolled_back_site_by_site() -> None:
    image, patches = dense(8, spacing=0x900)  # pages touch: 0x900 apart
    text = CountingText(BASE, image)
    calls = []

    def fail(addr: int, data: bytes) -> bool:
        calls.append(addr)
        return len(calls) == 1

    text.fail_write = fail
    sync, table = FakeSync(), new_table(16)
    with pytest.raises(OSError, match="injected write failure"):
        apply_patches(patches, text=text, sync=sync, table=table)
    assert bytes(text.memory) == bytes(image) and sync.calls == 1
    assert [a for _, a, _ in text.log] == [p.site for p in patches]  # each first byte put back
    assert table.as_dict() == {p.site: p.old for p in patches}


def test_a_tail_read_back_mismatch_names_the_first_site_in_batch_order() -> None:
    image, patches = dense(30)
    victims = {patches[20].site, patches[7].site}

    class Clobbering(FakeText):
        def write(self, addr: int, data: bytes) -> None:
            super().write(addr, data)
            if addr == patches[0].site + 1:  # the tail step's coalesced write
                for site in victims:
                    self.memory[site - BASE + 2] ^= 0xFF

    order = list(reversed(patches))
    text = Clobbering(BASE, image)
    with pytest.raises(PatchError, match=f"site {patches[20].site:#x} reads back .* after writing tail.*1 other"):
        apply_patches(order, text=text, sync=FakeSync(), table=new_table(64))


def test_patch_array_checks_like_patch() -> None:
    site = BASE
    call = np.frombuffer(encode_call(site, BASE + 0x100), dtype=np.uint8)
    nop = np.frombuffer(NOP5, dtype=np.uint8)
    ok = PatchArray.build([site, site + 5], np.stack([nop, nop]), np.stack([call, nop]))
    assert list(ok) == [Patch(site=site, old=NOP5, new=call.tobytes()), Patch(site=site + 5, old=NOP5, new=NOP5)]
    assert ok[1] == Patch(site=site + 5, old=NOP5, new=NOP5) and len(ok[1:]) == 1
    assert list(ok.reverted()) == revert_patches(list(ok))
    assert PatchArray.of(list(ok)) == ok
    with pytest.raises(UsageError, match="not a valid address"):
        PatchArray.build([0], nop[None], nop[None])
    with pytest.raises(UsageError, match="not a valid address"):
        PatchArray.build([2**64 - 4], nop[None], nop[None])
    with pytest.raises(SiteError, match="not nop5, call rel32 or jmp rel32"):
        PatchArray.build([site], nop[None], np.zeros((1, 5), np.uint8))
    with pytest.raises(UsageError, match=r"\(1, 5\) u8"):
        PatchArray.build([site], nop[None], np.zeros((1, 4), np.uint8))
    with pytest.raises(ValueError):
        ok.sites[0] = 1  # read-only columns


def test_read_sites_reads_each_run_once() -> None:
    image, patches = dense(100)
    text = FakeText(BASE, image)
    sites = np.array([p.site for p in reversed(patches)], dtype=np.uint64)
    rows = read_sites(text, sites)
    assert text.reads == 1
    assert [r.tobytes() for r in rows] == [NOP5] * 100


def test_empty_batch() -> None:
    text, sync, steps = FakeText(BASE, bytes(64)), FakeSync(), []
    result = apply_patches([], text=text, sync=sync, table=new_table(), on_step=steps.append)
    assert result == BatchResult(patched=(), skipped=(), syncs=0)
    assert (sync.calls, text.log, text.reads, steps) == (0, [], 0, [Step.VERIFIED])


def test_a_hundred_thousand_sites_in_one_bulk_batch() -> None:
    """Every site written, read back and published; the revert gives the same bytes back."""
    count = 100_000
    image, patches = dense(count)
    sites = np.array([p.site for p in patches], dtype=np.uint64)
    batch = PatchArray.of(patches)
    text = CountingText(BASE, image)
    table = SiteTable(bytearray(SiteTable.size_for(1 << 18)), capacity=1 << 18)
    result = apply_patches(batch, text=text, sync=FakeSync(), table=table)
    assert len(result.patched) == count and result.syncs == 3 and len(text.writes) == 3
    found, insns = table.lookup_many(sites)
    assert found.all() and np.array_equal(insns, batch.new)
    apply_patches(batch.reverted(), text=text, sync=FakeSync(), table=table)
    assert bytes(text.memory) == bytes(image)
    assert INT3 not in bytes(text.memory[sites[0] - BASE : sites[0] - BASE + 1])


def test_someone_elses_int3_between_sites_is_never_written() -> None:
    """A breakpoint between two sites of a run (and a foreign site left out) is written
    around, not over: were it removed meanwhile, writing it back would leave an int3
    that nothing handles."""
    image, patches = dense(40)
    breakpoint_at = patches[10].site + 8  # between sites 10 and 11
    image[breakpoint_at - BASE] = INT3_BYTE
    foreign = patches[20].site
    image[foreign - BASE] = INT3_BYTE  # a foreign int3 on a site of the batch
    text = CountingText(BASE, image)
    result = apply_patches(patches, text=text, sync=FakeSync(), table=new_table(128), skip_foreign=True)
    assert result.foreign == (foreign,) and len(result.patched) == 39
    for addr, size in text.writes:
        assert not addr <= breakpoint_at < addr + size
        assert not addr <= foreign < addr + size
    assert text.memory[breakpoint_at - BASE] == INT3_BYTE and text.memory[foreign - BASE] == INT3_BYTE
    assert len(text.writes) == 3 * 3  # each step: three parts around the two int3s
    expected = bytearray(image)
    for p in patches:
        if p.site != foreign:
            expected[p.site - BASE : p.site - BASE + 5] = p.new
    assert bytes(text.memory) == bytes(expected)
