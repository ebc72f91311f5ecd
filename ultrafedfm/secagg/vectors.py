"""Flatten a model's named arrays into the one vector that is masked, and back.

Every site must lay its delta out identically, or the masked sums add unrelated coordinates;
names are therefore taken in sorted order, and the layout (names, shapes, dtypes) can be
compared between the server and the sites.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np

_logger = logging.getLogger(__name__)

__all__ = ["ArrayLayout", "flatten_arrays", "unflatten_arrays"]


@dataclass(frozen=True)
class ArrayLayout:
    """Names, shapes and dtypes of the arrays in a flat vector, in vector order."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _ in self.entries)


def flatten_arrays(arrays: Mapping[str, np.ndarray], *, dtype: type = np.float32) -> tuple[np.ndarray, ArrayLayout]:
    """One contiguous ``dtype`` vector of all arrays, in sorted-name order, and its layout."""
    names = sorted(arrays)
    layout = ArrayLayout(tuple((n, tuple(np.shape(arrays[n])), np.asarray(arrays[n]).dtype.str) for n in names))
    vector = np.empty(layout.size, dtype=dtype)
    offset = 0
    for name in names:
        flat = np.asarray(arrays[name]).reshape(-1)
        vector[offset:offset + flat.size] = flat
        offset += flat.size
    return vector, layout


def unflatten_arrays(vector: np.ndarray, layout: ArrayLayout) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten_arrays` (arrays get their original dtypes and shapes)."""
    if vector.shape != (layout.size,):
        raise ValueError(f"vector has shape {vector.shape}, the layout describes {layout.size} values; "
                         "server and sites flattened different models")
    out, offset = {}, 0
    for name, shape, dtype in layout.entries:
        count = int(np.prod(shape, dtype=np.int64))
        out[name] = vector[offset:offset + count].reshape(shape).astype(np.dtype(dtype), copy=False)
        offset += count
    return out
