"""The numpy solver's row plan: padded lengths as its docstring states them and chunks as large as the memory bound allows.

These only decide speed and peak memory (any padded length >= a row's length solves it
exactly), so the answer tests cannot see them; the plan is checked against its stated rule.
"""

import math

import numpy as np

from cdimf.common.core.ials_numpy import CHUNK_FLOATS, _bucket_edges, _plan_chunks


def test_padded_lengths_are_exact_up_to_8_then_grow_by_an_eighth() -> None:
    """0..8 exactly, then e' = max(e + 1, ceil(1.125 e)) until the longest row is covered."""
    edges = _bucket_edges(1000).tolist()
    expected = list(range(9))
    while expected[-1] < 1000:
        expected.append(max(expected[-1] + 1, math.ceil(expected[-1] * 1.125)))
    assert edges == expected
    assert _bucket_edges(5).tolist() == [0, 1, 2, 3, 4, 5]


def test_each_chunk_fills_the_float_budget_of_its_padded_length() -> None:
    """Every row once; a chunk of padded length p and rank d holds floor(CHUNK_FLOATS / (p d + min(p, d)^2 + d)) rows, the last one fewer."""
    rank = 64
    lengths = np.repeat(np.array([0, 3, 9, 40, 300]), [5000, 20000, 20000, 3000, 500])
    chunks = _plan_chunks(lengths, rank)
    assert sorted(np.concatenate([rows for rows, _ in chunks]).tolist()) == list(range(len(lengths)))
    by_length: dict[int, list[int]] = {}
    for rows, pad in chunks:
        assert np.all(lengths[rows] <= pad)
        by_length.setdefault(pad, []).append(len(rows))
    for pad, sizes in by_length.items():
        full = max(1, CHUNK_FLOATS // (pad * rank + min(pad, rank) ** 2 + rank))
        assert all(size == full for size in sizes[:-1]) and 1 <= sizes[-1] <= full, (pad, sizes)
