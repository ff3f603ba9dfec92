"""titans-compose sweep: a tiny 2x2 sweep end to end, resuming after an interruption, a failing point, validation."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

from tests.helpers import SPECS
from titans_compose.cli.main import cli
from titans_compose.errors import SpecError
from titans_compose.registry import new_registry
from titans_compose.sweep import load_plan, plot, run_sweep, table
from titans_compose.sweep.plan import point_key
from titans_compose.sweep.run import make_sweep_task, run_point
from titans_compose.train.loop import train
from titans_compose.train.tasks import passkey_batch

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "model.dim": 32,
    "memory.heads": 1,
    "memory.head_dim": 16,
    "memory.expansion": 2,
    "blocks.0.repeat": 1,
}
TRAIN = {"task": "passkey", "digits": 1, "seq_len": 48, "steps": 3, "batch": 2, "eval_batches": 1, "lr": 0.003}


def write_sweep(tmp_path, **extra):
    data = {"name": "tiny", "base": str(SPECS / "titans_lmm_small.yaml"), "set": TINY, "train": TRAIN, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


GRID = {"grid": {"memory.depth": [1, 2], "update.momentum": [True, False]}}


def test_a_2x2_sweep_runs_end_to_end_with_a_table(tmp_path, runner):
    out = tmp_path / "out"
    result = runner.invoke(cli, ["sweep", str(write_sweep(tmp_path, **GRID)), "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in data["points"]]
    assert names == [
        "memory.depth=1 update.momentum=true",
        "memory.depth=1 update.momentum=false",
        "memory.depth=2 update.momentum=true",
        "memory.depth=2 update.momentum=false",
    ]
    assert all(r["status"] == "ok" and r["steps"] == 3 for r in data["points"])
    assert all(0 <= r["val_accuracy"] <= 1 and r["tokens_per_s"] > 0 and r["parameters"] > 0 for r in data["points"])
    # depth 2 has a hidden layer more in every memory; momentum adds its gate
    params = [r["parameters"] for r in data["points"]]
    assert params[2] > params[0] and params[0] > params[1]
    assert data["axes"] == ["memory.depth", "update.momentum"] and data["train"]["steps"] == 3
    for name in names:
        assert name in result.output
    assert "accuracy" in result.stdout.splitlines()[0]
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("key,point,memory.depth,update.momentum,status,parameters")
    assert len(rows) == 5


def test_an_interrupted_sweep_resumes_without_redoing_finished_points(tmp_path):
    plan = load_plan(write_sweep(tmp_path, **GRID), new_registry())
    task = make_sweep_task(plan)
    out = tmp_path / "out"
    ran = []

    def interrupted(point, *args):
        if len(ran) == 2:
            raise KeyboardInterrupt
        ran.append(point.name)
        return run_point(point, *args)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, out, plugins=[], progress=False, runner=interrupted, task=task)
    saved = json.loads((out / "results.json").read_text())["points"]
    assert [r["name"] for r in saved] == ran

    resumed = []

    def counting(point, *args):
        resumed.append(point.name)
        return run_point(point, *args)

    records = run_sweep(plan, out, plugins=[], progress=False, runner=counting, task=task)
    assert resumed == [p.point.name for p in plan.points[2:]]
    assert [r["status"] for r in records] == ["ok"] * 4
    assert records[:2] == saved  # the finished points' results are kept as they were
    run_sweep(plan, out, plugins=[], progress=False, runner=counting, task=task)
    assert len(resumed) == 2  # nothing left to do


def test_a_failing_point_is_recorded_and_the_others_finish(tmp_path, runner):
    # a 64-token vocabulary validates but cannot take the task's bytes: the point fails, the sweep goes on
    variants = {
        "variants": [
            {"name": "ok"},
            {"name": "broken", "set": {"model.vocab_size": 64}},
            {"name": "ok2", "set": {"memory.expansion": 1}},
        ]
    }
    path = write_sweep(tmp_path, **variants)
    out = tmp_path / "out"
    result = runner.invoke(cli, ["sweep", str(path), "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    points = {r["name"]: r for r in json.loads((out / "results.json").read_text())["points"]}
    assert points["ok"]["status"] == points["ok2"]["status"] == "ok"
    assert points["broken"]["status"] == "failed"
    # the point is refused before it is built, with the reason (it used to fail inside the model)
    error = points["broken"]["error"]
    assert error.startswith("ValueError: model.vocab_size is 64, but the training data (passkey: 1 digits")
    assert "hold byte values up to 121: a byte-level model needs a vocab_size above 121" in error
    assert "failed: broken: ValueError: model.vocab_size is 64" in result.stdout
    # a rerun keeps the failure unless asked to retry it
    plan = load_plan(path, new_registry())
    tried = []

    def counting(point, *args):
        tried.append(point.name)
        return run_point(point, *args)

    run_sweep(plan, out, plugins=[], progress=False, runner=counting)
    assert tried == []
    records = run_sweep(plan, out, plugins=[], progress=False, runner=counting, retry_failed=True)
    assert tried == ["broken"] and records[1]["status"] == "failed"


def test_every_bad_point_is_reported_before_anything_runs(tmp_path, runner):
    variants = [{"name": "a"}, {"name": "b", "set": {"blocks.0.kind": "mag", "attention.heads": 3}}]
    path = write_sweep(tmp_path, variants=variants, grid={"memory.depth": [1, 0], "memory.actvation": ["silu"]})
    out = tmp_path / "out"
    result = runner.invoke(cli, ["sweep", str(path), "-o", str(out)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    depth = next(line for line in lines if "memory.depth" in line and "[TC204]" in line)
    assert depth.startswith(f"{path}:") and "(in points a memory.depth=0" in depth
    assert any("memory.actvation: unknown key 'actvation' (in every point) [TC201]" in line for line in lines)
    assert any("attention.heads = 3 does not divide" in line and "[TC301]" in line for line in lines)
    assert not out.exists()


def test_bad_sweep_file_and_train_options_are_located(tmp_path):
    path = write_sweep(tmp_path, bogus=1, train={**TRAIN, "steps": 0, "batchh": 2})
    with pytest.raises(SpecError) as exc:
        load_plan(path, new_registry())
    assert sorted(exc.value.codes) == ["TC201", "TC201", "TC204"]
    assert "did you mean 'batch'?" in str(exc.value)
    # values that compare false against every bound (NaN, infinities) are refused like out-of-range ones
    path = write_sweep(tmp_path, train={**TRAIN, "lr": float("nan"), "max_mb": float("inf")})
    with pytest.raises(SpecError) as exc:
        load_plan(path, new_registry())
    assert sorted(exc.value.codes) == ["TC204", "TC204"] and "is not a finite number" in str(exc.value)
    # a NaN or infinite time budget would never end its point; a seed outside torch's range would fail deep inside
    for bad in ({"train": {**TRAIN, "minutes": float("nan")}}, {"train": {**TRAIN, "minutes": float("inf")}}):
        with pytest.raises(SpecError) as exc:
            load_plan(write_sweep(tmp_path, **bad), new_registry())
        assert exc.value.codes == ["TC204"] and "train.minutes" in str(exc.value)
    with pytest.raises(SpecError) as exc:
        load_plan(write_sweep(tmp_path, seed=2**64), new_registry())
    assert exc.value.codes == ["TC204"] and "seed" in str(exc.value)
    path = write_sweep(tmp_path, zip={"memory.depth": [1, 2], "memory.expansion": [2]})
    with pytest.raises(SpecError, match="zip lists must have equal lengths"):
        load_plan(path, new_registry())


def test_points_that_resolve_to_the_same_spec_are_refused(tmp_path):
    path = write_sweep(tmp_path, variants=[{"name": "a"}, {"name": "b", "set": {"memory.depth": 2}}])
    with pytest.raises(SpecError, match="points a, b resolve to the same spec and budget"):
        load_plan(path, new_registry())


def test_zip_and_variants_combine_as_a_product(tmp_path):
    variants = [{"name": "lmm"}, {"name": "mag", "set": {"blocks.0.kind": "mag", "attention.heads": 2}}]
    path = write_sweep(tmp_path, variants=variants, zip={"memory.depth": [1, 2], "memory.expansion": [2, 4]})
    plan = load_plan(path, new_registry())
    assert [p.point.name for p in plan.points] == [
        "lmm memory.depth=1 memory.expansion=2",
        "lmm memory.depth=2 memory.expansion=4",
        "mag memory.depth=1 memory.expansion=2",
        "mag memory.depth=2 memory.expansion=4",
    ]
    spec = plan.points[3].loaded.spec
    assert (spec.blocks[0].kind, spec.blocks[0].memory.depth, spec.blocks[0].memory.expansion) == ("mag", 2, 4)
    # the key follows the resolved spec and the budget
    assert len({p.key for p in plan.points}) == 4
    loaded = plan.points[0].loaded
    assert point_key(loaded, 0, plan.train) == plan.points[0].key
    assert point_key(loaded, 0, plan.train) != point_key(loaded, 0, {**plan.train, "steps": 4})


def test_a_time_limit_ends_training_after_the_step_that_passes_it():
    model = torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256))

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, tokens):
            return type("Out", (), {"logits": self.net(tokens)})()

    result = train(
        LM(),
        lambda step: passkey_batch(2, 48, digits=1, seed=step),
        steps=50,
        eval_fn=lambda m: {"x": 1.0},
        progress=False,
        time_limit=0.0,
    )
    assert len(result.history) == 1 and result.evals == [(1, {"x": 1.0})]


def test_the_plot_is_optional(tmp_path, monkeypatch):
    records = [
        {"name": "a", "status": "ok", "val_accuracy": 0.5, "tokens_per_s": 10.0, "parameters": 3},
        {"name": "b", "status": "failed", "error": "ValueError: no"},
    ]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert (
        plot(records, tmp_path / "p.png", "t")
        == "no plot: matplotlib is not installed (pip install matplotlib to get one)"
    )
    assert not (tmp_path / "p.png").exists()
    text = table(records).splitlines()
    assert text[0].split() == ["point", "params", "tok/s", "accuracy", "status"]
    assert text[-1] == "failed: b: ValueError: no"


def test_a_held_sweep_directory_is_refused(tmp_path):
    import fcntl

    from titans_compose.lock import LOCK_FILE
    from titans_compose.sweep import SweepError

    plan = load_plan(write_sweep(tmp_path), new_registry())
    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK_FILE, "w") as held:  # as another sweep process holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SweepError, match=f"{out} is in use by another titans-compose sweep"):
            run_sweep(plan, out, plugins=[], progress=False, runner=lambda *args: {"parameters": 1})
    assert not (out / "results.json").exists()


def test_reruns_name_skipped_points_and_every_point_keeps_its_metrics(tmp_path, runner):
    out = tmp_path / "out"
    path = write_sweep(tmp_path, **{"grid": {"memory.depth": [1, 2]}})
    first = runner.invoke(cli, ["sweep", str(path), "--output", str(out), "--no-progress"])
    assert first.exit_code == 0, first.output
    records = json.loads((out / "results.json").read_text())["points"]
    for record in records:
        folder = out / "points" / record["key"]
        assert json.loads((folder / "result.json").read_text()) == record
        metrics = json.loads((folder / "metrics.json").read_text())
        assert [r["step"] for r in metrics["history"]] == [1, 2, 3] and [s for s, _ in metrics["evals"]] == [3]
        assert metrics["evals"][-1][1]["val_accuracy"] == record["val_accuracy"]
    again = runner.invoke(cli, ["sweep", str(path), "-o", str(out), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert (
        f"skipping 2 point(s) finished earlier (results in {out / 'results.json'}): memory.depth=1; memory.depth=2"
        in again.output
    )
    # another budget makes other points: the earlier points' folders stay, with their metrics
    changed = write_sweep(tmp_path, **{"grid": {"memory.depth": [1, 2]}, "train": {**TRAIN, "steps": 2}})
    assert runner.invoke(cli, ["sweep", str(changed), "-o", str(out), "--no-progress"]).exit_code == 0
    assert {p.name for p in (out / "points").iterdir()} >= {r["key"] for r in records}
    assert len(list((out / "points").iterdir())) == 4


@pytest.mark.parametrize("finished", [0, 1])
def test_an_interrupted_sweep_names_where_its_results_are(tmp_path, runner, monkeypatch, finished):
    import re

    import titans_compose.sweep

    path = write_sweep(tmp_path, **{"grid": {"memory.depth": [1, 2]}})
    out = tmp_path / "out"
    real = titans_compose.sweep.run_sweep

    def interrupted(*args, **kwargs):
        calls = []

        def runner_(point, *rest):
            if len(calls) == finished:
                raise KeyboardInterrupt
            calls.append(point)
            return {"parameters": 1}

        return real(*args, **{**kwargs, "runner": runner_})

    monkeypatch.setattr(titans_compose.sweep, "run_sweep", interrupted)
    result = runner.invoke(cli, ["sweep", str(path), "-o", str(out), "--no-progress"])
    assert result.exit_code == 130, result.output
    if finished:
        named = re.search(r"finished points are in (\S+);", result.output)
        assert named and named.group(1) == str(out / "results.json") and (out / "results.json").is_file()
    else:
        assert "interrupted: no point had finished; run the same command to resume" in result.output


def test_the_step_options_reach_training(tmp_path, runner):
    """accumulate, precision and the other step options of ``train`` are a sweep's too: two micro-batches of one
    sequence take the step one batch of two takes; bf16 changes the losses; ``parallel`` and ``context_parallel``
    are refused (a sweep is one process)."""

    def losses(name: str, **train: object) -> list[float]:
        path = write_sweep(tmp_path, train={**TRAIN, **train})
        out = tmp_path / name
        result = runner.invoke(cli, ["sweep", str(path), "-o", str(out), "--no-progress"])
        assert result.exit_code == 0, result.output
        (point,) = json.loads((out / "results.json").read_text())["points"]
        metrics = json.loads((out / "points" / point["key"] / "metrics.json").read_text())
        return [r["loss"] for r in metrics["history"]]

    whole = losses("whole", batch=2)
    assert losses("micro", batch=1, accumulate=2, activation_checkpointing=True) == pytest.approx(whole, rel=1e-5)
    assert losses("bf16", batch=2, precision="bf16") != pytest.approx(whole, rel=1e-5)
    for key, value in (("parallel", "fsdp"), ("context_parallel", 2)):
        with pytest.raises(SpecError) as exc:
            load_plan(write_sweep(tmp_path, train={**TRAIN, key: value}), new_registry())
        assert exc.value.codes == ["TC201"] and f"train.{key}" in str(exc.value)


def test_seed_option_replaces_the_files_seed(tmp_path, runner):
    """`--seed 1` runs the points a file with `seed: 1` runs (same keys, same losses), and not the file's seed 0."""
    plain = write_sweep(tmp_path)
    seeded = tmp_path / "seeded.yaml"
    seeded.write_text(plain.read_text() + "seed: 1\n")
    keys = {
        "option": [p.key for p in load_plan(plain, new_registry(), seed=1).points],
        "file": [p.key for p in load_plan(seeded, new_registry()).points],
        "default": [p.key for p in load_plan(plain, new_registry()).points],
    }
    assert keys["option"] == keys["file"] and keys["option"] != keys["default"]
    losses = {}
    for name, args in {"option": [str(plain), "--seed", "1"], "file": [str(seeded)], "default": [str(plain)]}.items():
        out = tmp_path / name
        result = runner.invoke(cli, ["sweep", *args, "-o", str(out), "--no-progress"])
        assert result.exit_code == 0, result.output
        losses[name] = [r["train_loss"] for r in json.loads((out / "results.json").read_text())["points"]]
    assert losses["option"] == losses["file"] and losses["option"] != losses["default"]
