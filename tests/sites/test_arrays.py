"""sites._arrays.unique: np.unique's answer without its numpy.ma import."""

from __future__ import annotations

import numpy as np
import pytest

from textpoke.sites._arrays import unique


@pytest.mark.parametrize("dtype", [np.uint64, np.int64, np.int32])
@pytest.mark.parametrize("size", [0, 1, 2, 7, 1000])
def test_unique_is_np_unique(dtype, size):
    values = np.random.default_rng(size).integers(0, max(size // 3, 1) + 1, size=size).astype(dtype)
    got = unique(values)
    assert got.dtype == dtype
    assert got.tolist() == np.unique(values).tolist()
