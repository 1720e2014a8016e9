"""Counting trampolines: the cheapest thing a site can call.

Each counter ``i`` has a 16-byte trampoline ``lock inc qword [rip+slot_i]; ret``
in a code page near the sites, and its u64 slot in the data page after it (the
same memfd, RW for the tool, which reads the counts with numpy at any time).
At a function entry (fentry) flags are dead and no register is touched, so
nothing needs saving.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence

import numpy as np
from iced_x86 import Decoder

from .._errors import UsageError
from ..poke.protocol import Patch, revert_patches
from ..poke.session import Session

from ..poke.resident import PAGE, Resident, SharedRegion
from ..x86.asm import Asm, R, mem
from ..x86.insn import INT3, NOP5, encode_call

STUB_SIZE = 16


def _pages(size: int) -> int:
    return max(PAGE, (size + PAGE - 1) // PAGE * PAGE)


class Counters:
    """``n`` counting trampolines in the target, within rel32 reach of ``near``."""

    def __init__(self, resident: Resident, *, n: int, near: int) -> None:
        code_size = _pages(n * STUB_SIZE)
        data_size = _pages(n * 8)
        self.region: SharedRegion = resident.map_shared(code_size=code_size, data_size=data_size,
                                                        near=near, name="textpoke-counters")
        self.n = n
        # Fixed 16-byte stride so entry(i) is arithmetic. One template is
        # assembled; stub i differs only in its rip-relative displacement,
        # which moves by +8 (its slot) - 16 (its own position) per stub.
        template = Asm()
        template.op("INC_RM64", mem(R.RIP, code_size), lock=True)
        template.op("RETNQ")
        code, _ = template.assemble(0)
        decoder = Decoder(64, code)
        offsets = decoder.get_constant_offsets(decoder.decode())
        at = offsets.displacement_offset
        (disp0,) = struct.unpack_from("<i", code, at)
        stubs = bytearray(INT3 * (n * STUB_SIZE))
        for i in range(n):
            stub = bytearray(code)
            struct.pack_into("<i", stub, at, disp0 + 8 * i - STUB_SIZE * i)
            stubs[i * STUB_SIZE : i * STUB_SIZE + len(stub)] = stub
        self.region.local[: len(stubs)] = bytes(stubs)
        self._counts = np.frombuffer(self.region.local, dtype="<u8", count=n, offset=code_size)

    def entry(self, i: int) -> int:
        """Address of counter ``i``'s trampoline in the target."""
        return self.region.address + i * STUB_SIZE

    def counts(self) -> np.ndarray:
        return self._counts.copy()


class CountingSession:
    """Count every call at a set of fentry sites while the ``with`` block runs.

    Entering patches every site ``nop5 -> call counter_i`` in one batch;
    leaving puts the nop5s back in one batch.  :meth:`counts` may be read at
    any time (the tool reads the target's counters through shared memory).
    """

    def __init__(self, session: Session, sites: Sequence[int]) -> None:
        if not sites:
            raise UsageError("no sites to count", hint="check the function globs with `textpoke sites`")
        self.session = session
        self.sites = list(sites)
        self.counters = Counters(session.resident, n=len(self.sites), near=min(self.sites))
        self._batch = [Patch(site=site, old=NOP5, new=encode_call(site, self.counters.entry(i)))
                       for i, site in enumerate(self.sites)]
        self.patch_seconds = 0.0

    def __enter__(self) -> CountingSession:
        started = time.perf_counter()
        self.session.apply(self._batch)
        self.patch_seconds = time.perf_counter() - started
        return self

    def __exit__(self, et: object, ev: object, tb: object) -> None:
        if self.session.process.alive():
            self.session.apply(revert_patches(self._batch))

    def counts(self) -> np.ndarray:
        return self.counters.counts()
