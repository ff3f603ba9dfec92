"""Option grids for parametrised tests: which cases the fast run (``pytest -m "not slow"``) keeps.

A module of its own, not conftest.py: test modules import it, and scripts that the tests run in fresh processes
import those modules, which must not pick up conftest's environment settings (it switches Triton's interpreter on).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest


def fast_subset(cases: list, strength: int = 1) -> list:
    """``cases`` of a parametrised grid (tuples of values, or dicts) as pytest params, all but a covering subset marked
    ``slow``: the unmarked cases together hold every value of every parameter (``strength`` 1) or every pair of
    values of two parameters (``strength`` 2), so ``pytest -m "not slow"`` still runs every option. The subset is
    chosen greedily, in order, and is the same on every run."""

    def combos(case: Any) -> set[tuple]:
        items = sorted(case.items()) if isinstance(case, dict) else list(enumerate(case))
        features = [(name, repr(value)) for name, value in items]
        return set(itertools.combinations(features, strength))

    wanted = [combos(case) for case in cases]
    uncovered = set().union(*wanted)
    fast: set[int] = set()
    while uncovered:
        best = max(range(len(cases)), key=lambda i: (len(wanted[i] & uncovered), -i))
        fast.add(best)
        uncovered -= wanted[best]
    return [
        case if i in fast else pytest.param(*(case if isinstance(case, tuple) else (case,)), marks=pytest.mark.slow)
        for i, case in enumerate(cases)
    ]
