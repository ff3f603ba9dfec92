"""benchmarks/compare_titans_pytorch.py without titans-pytorch: our side of one configuration in each feature set,
and the per-round speed-up summary (titans-pytorch is not a dependency, so its side is not run here)."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest

from tests.helpers import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("compare_titans_pytorch.py", "compare_benchmark")


@pytest.mark.parametrize("features", ["paper", "titans"])
@pytest.mark.parametrize("retrieval", ["per_chunk", "after"])
def test_our_side_builds_and_measures(bench, features, retrieval, capsys):
    args = Namespace(impl="ours", chunk=8, retrieval=retrieval, features=features, seq=20, repeats=1)
    bench.worker(args)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"fwd", "fwd_bwd", "floor_fwd", "floor_fwd_bwd", "peak_rss_mb"}
    assert all(value > 0 for value in result.values())


@pytest.mark.parametrize("retrieval", ["per_chunk", "after"])
def test_titans_features_switch_off_what_titans_pytorch_lacks(bench, retrieval):
    _, paper, _ = bench.build_ours(8, retrieval, "paper")
    _, titans, _ = bench.build_ours(8, retrieval, "titans")
    assert len(list(paper.convs.children())) == 3 and not list(titans.convs.children())
    per_chunk_gates = ("per_token", "per_chunk", "per_chunk")
    assert (titans.config.gates == per_chunk_gates) == (retrieval == "per_chunk")
    assert paper.config.gates == ("per_token",) * 3


def test_speed_ups_are_ratios_within_a_round(bench):
    def run(fwd_bwd: float, fwd: float, floor: float | None = None) -> dict:
        out = {"fwd_bwd": fwd_bwd, "fwd": fwd, "peak_rss_mb": 100 * fwd}
        return out if floor is None else {**out, "floor_fwd_bwd": floor}

    # the machine slows down 3x in round 2: a ratio of medians would mix the rounds, a median of ratios does not
    runs = {
        ("titans", 1024, 64, "per_chunk"): [run(4.0, 2.0), run(12.0, 6.0), run(4.4, 2.2)],
        ("ours", 1024, 64, "after"): [run(2.0, 1.0, 1.0), run(6.6, 3.0, 3.0), run(2.0, 1.1, 1.1)],
    }
    m = bench.summarise(runs, 1024, 64, "after")
    assert m["speedup_fwd_bwd"] == pytest.approx(2.0)
    assert m["speedup_range"] == pytest.approx((12.0 / 6.6, 2.2))
    assert m["speedup_fwd"] == pytest.approx(2.0)
    assert m["speedup_at_floor"] == pytest.approx(4.0)
    assert (m["ours_fwd_bwd"], m["titans_fwd_bwd"]) == (2.0, 4.4)
    assert (m["ours_rss"], m["titans_rss"]) == (300.0, 600.0)
    assert "| 1024 | 64 | after | 2000 | 4400 | 2.00x | 1.82-2.20x |" in bench.table(
        {(1024, 64, "after"): m}, [(1024, 64)], ["after"]
    )
