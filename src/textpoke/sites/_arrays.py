"""Array helpers shared by the ELF readers."""

from __future__ import annotations

import numpy as np


def unique(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values of a 1-d array, as ``np.unique(values)``.

    A plain ``np.unique`` imports ``numpy.ma`` to rule out masked arrays (30 ms, once
    per process): on the path of every ``trace``, before the first byte is patched."""
    ordered = np.sort(np.asarray(values).ravel())
    if len(ordered) < 2:
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]
