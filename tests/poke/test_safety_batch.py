"""check_addresses' whole-batch fast path (arrays) agrees with the one-by-one check."""

from __future__ import annotations

import pytest

from textpoke import OwnCodeRefused, SiteError
from textpoke.poke.protocol import Patch
from textpoke.poke.safety import _all_clear, _Maps, check_addresses
from textpoke.target.maps import Mapping
from textpoke.x86.insn import NOP5, encode_call, encode_jmp

TEXT = Mapping(start=0x400000, end=0x402000, perms="r-xp", offset=0, dev="08:01", inode=1, path="/bin/prog")
DATA = Mapping(start=0x600000, end=0x601000, perms="rw-p", offset=0, dev="08:01", inode=1, path="/bin/prog")
RESIDENT = Mapping(start=0x7000_0000, end=0x7000_1000, perms="r-xs", offset=0, dev="00:01", inode=9,
                   path="/memfd:textpoke (deleted)")
TRAMPOLINE = Mapping(start=0x7000_4000, end=0x7000_5000, perms="r-xs", offset=0, dev="00:01", inode=10,
                     path="/memfd:textpoke-counter (deleted)")
VSYSCALL = Mapping(start=0xFFFF_FFFF_FF60_0000, end=0xFFFF_FFFF_FF60_1000, perms="--xp", offset=0, dev="00:00",
                   inode=0, path="[vsyscall]")


class FakeProcess:
    pid = 4242


class FakeCache:
    def __init__(self) -> None:
        self.maps = _Maps([TEXT, DATA, RESIDENT, TRAMPOLINE, VSYSCALL])

    def current(self) -> _Maps:
        return self.maps

    fresh = current


def call(site: int, target: int) -> Patch:
    return Patch(site=site, old=NOP5, new=encode_call(site, target))


GOOD = [call(0x400100, 0x400800), call(0x400200, 0x7000_4010),
        Patch(site=0x400300, old=NOP5, new=encode_jmp(0x400300, 0x401000)),
        Patch(site=0x400400, old=encode_call(0x400400, 0x400800), new=NOP5),
        Patch(site=0x400500, old=NOP5, new=NOP5)]


def test_a_good_batch_is_cleared_at_once():
    assert _all_clear(FakeCache().maps, GOOD)
    check_addresses(FakeProcess(), GOOD, maps=FakeCache())  # type: ignore[arg-type]


@pytest.mark.parametrize("bad, error", [
    (call(0x600010, 0x400800), SiteError),  # site in data
    (call(0x401FFE, 0x400800), SiteError),  # the last bytes past the mapping
    (call(0x500000, 0x400800), SiteError),  # site in no mapping
    (call(0x7000_0010, 0x400800), OwnCodeRefused),  # site in our handler
    (call(0x7000_4010, 0x400800), OwnCodeRefused),  # site in a trampoline of ours
    (call(0x400100, 0x600000), SiteError),  # call into data
    (call(0x400100, 0x7000_0020), OwnCodeRefused),  # call into our handler
    (call(0x400100, 0x500000), SiteError),  # call into nothing
])
def test_each_bad_patch_falls_back_to_the_exact_check(bad, error):
    batch = [*GOOD, bad]
    assert not _all_clear(FakeCache().maps, batch)
    with pytest.raises(error):
        check_addresses(FakeProcess(), batch, maps=FakeCache())  # type: ignore[arg-type]
