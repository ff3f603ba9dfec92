"""benchmarks/language_model.py: the matched baseline is as large as the largest memory variant, a run reports
what the table needs, and the summary compares every seed against the matched baseline."""

from __future__ import annotations

import argparse

import pytest

from tests.helpers import load_benchmark
from titans_compose.builder import build

language_model = load_benchmark("language_model.py", "language_model_under_test")


def test_the_matched_baseline_has_as_many_parameters_as_the_largest_memory_variant() -> None:
    def count(name: str) -> int:
        spec, overrides = language_model.MODELS[name]
        return sum(p.numel() for p in build(language_model.SPECS / spec, overrides, smoke=False).module.parameters())

    matched = count(language_model.MATCHED)
    sizes = {name: count(name) for name in ("MAC", "MAG", "MAL", "LMM")}
    assert abs(matched / max(sizes.values()) - 1) < 0.007, (matched, sizes)  # 0.6%, as the docstring says


def test_a_run_reports_its_curve_and_final_bits_per_byte(tmp_path) -> None:
    (tmp_path / "a.py").write_text("def f(x):\n    return x + 1\n" * 400)
    (tmp_path / "b.py").write_text("class C:\n    pass\n" * 400)
    args = argparse.Namespace(
        steps=2, batch=2, seq_len=256, lr=3e-3, eval_every=1, val_batches=2, data=tmp_path, max_bytes=100_000,
        threads=1, jobs=2, set=[],
    )  # fmt: skip
    result = language_model.run("SWA", 0, args)
    assert [step for step, _ in result["curve"]] == [1, 2]
    assert 0 < result["val_bpb"] < 9 and result["params"] > 0
    # the spans cover every predicted byte once, so weighted by their lengths they average to the validation value
    # (float32 per-batch means there, float64 sums here: 1e-5 relative)
    lengths = [stop - start for start, stop in language_model.SPANS]
    assert sum(lengths) == args.seq_len - 1
    weighted = sum(b * n for b, n in zip(result["by_position"], lengths, strict=True)) / sum(lengths)
    assert weighted == pytest.approx(result["val_bpb"], rel=1e-5)


def test_the_summary_says_whether_a_variant_beats_the_baseline_in_every_seed() -> None:
    def r(bpb: float) -> dict:
        return {"params": 1, "minutes": 0.0, "train_loss": 0.0, "val_bpb": bpb, "curve": [], "by_position": [bpb] * 5}

    results = {
        ("MAC", 0): r(2.0), ("MAC", 1): r(2.0),
        ("MAG", 0): r(2.0), ("MAG", 1): r(2.6),
        ("SWA-matched", 0): r(2.5), ("SWA-matched", 1): r(2.5),
    }  # fmt: skip
    summary = language_model.tables(results, ["MAC", "MAG", "SWA-matched"], [0, 1]).split("\n\n")[1]
    assert "| MAC | 2.000 | -0.500 | yes |" in summary
    assert "| MAG | 2.300 | -0.200 | no |" in summary


def test_the_position_table_names_each_span_by_its_first_and_last_byte() -> None:
    results = {("MAG", 0): {"by_position": [3.0, 2.5, 2.25, 2.125, 2.0]}}
    table = language_model.position_table(results).split("\n")
    assert table[0] == "| variant | seed | bytes 1-15 | bytes 16-31 | bytes 32-63 | bytes 64-127 | bytes 128-255 |"
    assert table[2] == "| MAG | 0 | 3.000 | 2.500 | 2.250 | 2.125 | 2.000 |"
