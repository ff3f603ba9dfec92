"""The fast run's subset of an option grid covers every option (tests/grids.py)."""

from __future__ import annotations

import itertools

from tests.grids import fast_subset


def split(params: list) -> tuple[list, list]:
    """(unmarked cases, cases marked slow) of ``fast_subset``'s result."""
    fast = [p for p in params if not hasattr(p, "marks")]
    slow = [p.values for p in params if hasattr(p, "marks")]
    assert all([m.name for m in p.marks] == ["slow"] for p in params if hasattr(p, "marks"))
    return fast, slow


def test_every_value_and_every_pair_stays_in_the_fast_run():
    grid = list(itertools.product([1, 2, 3], [True, False], ["a", "b", "c", "d"], [1, 4, 16]))
    for strength in (1, 2):
        fast, slow = split(fast_subset(grid, strength))
        assert sorted(fast + slow) == sorted(grid)  # every case once, as it was
        for columns in itertools.combinations(range(4), strength):
            want = {tuple(case[c] for c in columns) for case in grid}
            assert {tuple(case[c] for c in columns) for case in fast} == want
        assert len(fast) <= (4 if strength == 1 else 16)  # the greedy cover stays near the smallest
    assert fast_subset(grid, 2) == fast_subset(grid, 2)  # the same subset on every run


def test_dict_cases_with_different_keys():
    grid = [dict(depth=1, loss="l2"), dict(depth=1, loss="l1"), dict(depth=2, loss="l2"), dict(depth=2, tiled=True)]
    fast, slow = split(fast_subset(grid))
    assert slow == [(grid[2],)] and fast == [grid[0], grid[1], grid[3]]
