"""benchmarks/train_throughput.py: the tables' ratios from synthetic runs, and a --dry-run of every section (the
CPU one, the context-parallel one and the GPU one's code path on the CPU) through real ``titans-compose train``
processes."""

from __future__ import annotations

from argparse import Namespace

import pytest

from tests.conftest import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("train_throughput.py", "train_throughput_benchmark")


def test_summaries_and_ratios(bench):
    def run(speed: float, train_mb: float) -> dict:
        return {"status": "ok", "tokens_per_s": speed, "peak_mb": train_mb + 300, "train_mb": train_mb, "cuda_mb": None}

    stats = {
        (1, False, "fp32"): bench.summary([run(1000, 200), run(1200, 210), run(900, 190)]),
        (2, False, "fp32"): bench.summary([run(1800, 205)]),
        (1, True, "fp32"): bench.summary([run(700, 120)]),
        (1, False, "bf16"): bench.summary([{"status": "failed: no"}]),
    }
    assert stats[(1, False, "fp32")]["tokens_per_s"] == 1000 and stats[(1, False, "fp32")]["range"] == (900, 1200)
    text = bench.cpu_table(Namespace(precisions=["fp32", "bf16"]), stats)
    assert "| 1 | off | fp32 | 1,000 | 900-1,200 | 500 | 200 |" in text
    assert "| tokens/s, 2 processes / 1 | fp32 | 1.80x |" in text
    assert "| train MB, checkpointing / without | fp32 | 0.60x |" in text
    assert "| 1 | off | bf16 | failed: no |" in text and "| tokens/s, bf16 / fp32 | 1 process | - |" in text
    long = bench.long_table(
        {
            ("MAC", 1): bench.summary([run(100, 800)]),
            ("MAC", 2): bench.summary([run(150, 500)]),
            ("MAG", 1): bench.summary([run(200, 600)]),
            ("MAG", 2): bench.summary([{"status": "failed: no"}]),
        }
    )
    assert "| MAC | 2, --context-parallel 2 | 150 | 150-150 | 800 | 500 |" in long
    assert "| tokens/s | MAC | 1.50x |" in long and "| train MB per process | MAC | 0.62x |" in long
    assert "| MAG | 2, --context-parallel 2 | failed: no |" in long and "| tokens/s | MAG | - |" in long


@pytest.mark.slow
def test_dry_run_measures_both_sections(bench, capsys):
    bench.main(["--dry-run"])
    out = capsys.readouterr().out
    for precision in ("fp32", "bf16"):  # train has --precision: both precisions run
        assert f"| 1 | off | {precision} |" in out and f"| 2 | off | {precision} |" in out
        assert f"| 1 | on | {precision} |" in out
    assert "| tokens/s, bf16 / fp32 | 1 process |" in out
    for model in ("MAC", "MAG"):  # the context-parallel section
        assert f"| {model} | 1 |" in out and f"| {model} | 2, --context-parallel 2 |" in out
    assert "failed" not in out
    assert "CPU (dry run): float32 matmul peak" in out and "| 2 | bf16 |" in out  # the GPU section, bf16 runs
