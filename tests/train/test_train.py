"""Training: byte corpus and split, the loop (schedule, learning, bit-exact resume), pickle-free checkpoints, CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load as load_tensors

from titans_compose.train import (
    Batch,
    CheckpointError,
    DataError,
    TrainingError,
    WindowSampler,
    load_corpus,
    lr_at,
    read_checkpoint,
    train,
)
from titans_compose.train.checkpoint import remove_interrupted
from titans_compose.train.data import decode, encode, is_validation
from titans_compose.train.loop import param_groups
from titans_compose.train.tasks import REPEAT_FILLER

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyLM(torch.nn.Module):
    """A stand-in with the language-model contract (``model(tokens).logits``): embedding, a causal mix of the
    previous token, dropout (so resuming must restore the RNG), a norm and an output layer."""

    def __init__(self, vocab: int = 256, dim: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(2 * dim, dim)
        self.drop = torch.nn.Dropout(0.1)
        self.norm = torch.nn.LayerNorm(dim)
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> SimpleNamespace:
        x = self.embed(tokens)
        previous = torch.nn.functional.pad(x, (0, 0, 1, 0))[:, :-1]
        h = self.norm(torch.tanh(self.mix(self.drop(torch.cat([x, previous], dim=-1)))))
        return SimpleNamespace(logits=self.out(h))


def tiny(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    root = tmp_path / "texts"
    for i in range(40):
        (root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 3}" / f"f{i:02d}.txt").write_text(f"file {i}: " + REPEAT_FILLER * 5)
    (root / "blob.bin").write_bytes(b"\0\1\2" * 100)  # not text: skipped
    return root


def repeat_source(batch: int = 4, seq_len: int = 48, seed: int = 0) -> WindowSampler:
    return WindowSampler(encode(REPEAT_FILLER * 40).to(torch.uint8), batch, seq_len, seed)


# --- data ---------------------------------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_split_by_file(text_dir: Path) -> None:
    a, b = load_corpus(text_dir), load_corpus(text_dir)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.files[0] > 0 and a.files[1] > 0 and sum(a.files) == 40  # the binary file is skipped
    val_files = [p for p in sorted(text_dir.rglob("*.txt")) if is_validation(p.relative_to(text_dir).as_posix(), 5.0)]
    assert len(val_files) == a.files[1]
    for path in val_files:  # a validation file's text is in val, not in train
        text = path.read_bytes()
        assert text in bytes(a.val.tolist()) and text not in bytes(a.train.tolist())


def test_split_depends_only_on_the_relative_path(tmp_path: Path, text_dir: Path) -> None:
    val_texts = [
        p.read_bytes() for p in sorted(text_dir.rglob("*.txt")) if is_validation(p.relative_to(text_dir).as_posix(), 5)
    ]
    moved = tmp_path / "elsewhere"
    text_dir.rename(moved)
    (moved / "a_first.txt").write_text("a new file sorted before the others\n")
    corpus = load_corpus(moved)
    assert sum(corpus.files) == 41
    val = bytes(corpus.val.tolist())
    assert val_texts and all(text in val for text in val_texts)


def test_corpus_cap_single_file_and_errors(tmp_path: Path, text_dir: Path) -> None:
    capped = load_corpus(text_dir, max_bytes=1000)
    assert capped.train.numel() + capped.val.numel() <= 1000 + 40  # plus the newlines joining files
    single = tmp_path / "one.txt"
    single.write_text("hello world " * 100)
    one = load_corpus(single)
    assert one.files == (1, 0) or one.files == (0, 1)
    assert one.train.numel() > 0 and one.val.numel() > 0  # split by bytes
    assert decode(torch.cat([one.train, one.val])) == "hello world " * 100
    with pytest.raises(DataError, match="no such file"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "b.bin").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="no text"):
        load_corpus(tmp_path / "empty")


def test_stdlib_corpus_loads_offline() -> None:
    corpus = load_corpus(max_bytes=200_000)
    assert corpus.source == "python stdlib" and corpus.train.dtype == torch.uint8
    assert 0 < corpus.train.numel() + corpus.val.numel() <= 200_000 + sum(corpus.files)
    assert torch.equal(corpus.train, load_corpus(max_bytes=200_000).train)


def test_window_sampler_is_a_function_of_seed_and_step() -> None:
    data = torch.arange(1000) % 256
    sampler = WindowSampler(data.to(torch.uint8), 3, 17, seed=5)
    a, b = sampler(4), WindowSampler(data.to(torch.uint8), 3, 17, seed=5)(4)
    assert torch.equal(a.tokens, b.tokens) and a.tokens.shape == (3, 17) and a.tokens.dtype == torch.long
    assert not torch.equal(a.tokens, sampler(5).tokens)
    starts = a.tokens[:, 0]
    assert torch.equal(a.tokens, (starts[:, None] + torch.arange(17)) % 256)  # consecutive bytes
    with pytest.raises(DataError, match="fewer than one window"):
        WindowSampler(data[:10].to(torch.uint8), 1, 17)


# --- loop ---------------------------------------------------------------------------------------------------------


def test_schedule_and_param_groups() -> None:
    assert lr_at(1, lr=1.0, warmup=4, steps=20) == 0.25 and lr_at(4, lr=1.0, warmup=4, steps=20) == 1.0
    assert lr_at(20, lr=1.0, warmup=4, steps=20) == pytest.approx(0.1)
    assert lr_at(12, lr=1.0, warmup=4, steps=20) == pytest.approx(0.55)
    model = TinyLM()
    decay, no_decay = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model.mix.weight), id(model.out.weight)}
    assert no_decay["weight_decay"] == 0.0 and any(p is model.embed.weight for p in no_decay["params"])


def test_tiny_model_learns() -> None:
    result = train(tiny(), repeat_source(), steps=40, lr=1e-2, warmup=4, progress=False)
    losses = [r.loss for r in result.history]
    assert len(losses) == 40 and [r.step for r in result.history] == list(range(1, 41))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert all(r.tokens_per_s > 0 for r in result.history)


def test_loss_mask_selects_targets() -> None:
    tokens = encode(REPEAT_FILLER[:32]).expand(2, -1)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, -3:] = True
    model = tiny()
    model.eval()
    from titans_compose.train import lm_loss

    logits = model(tokens).logits
    expected = torch.nn.functional.cross_entropy(logits[:, -4:-1].reshape(-1, 256), tokens[:, -3:].reshape(-1))
    assert torch.allclose(lm_loss(model, Batch(tokens, mask)), expected)
    with pytest.raises(TrainingError, match="selects no target"):
        lm_loss(model, Batch(tokens, torch.zeros_like(mask)))


def test_evaluation_runs_periodically_in_eval_mode() -> None:
    seen: list[bool] = []

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        seen.append(model.training or torch.is_grad_enabled())
        return {"x": 1.0}

    result = train(tiny(), repeat_source(), steps=7, eval_every=3, eval_fn=eval_fn, progress=False)
    assert [s for s, _ in result.evals] == [3, 6, 7] and seen == [False] * 3


def test_non_finite_loss_stops_with_the_step() -> None:
    model = tiny()
    with torch.no_grad():
        model.out.bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match="at step 1"):
        train(model, repeat_source(), steps=3, progress=False)


class Interrupt(Exception):
    pass


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    kwargs = {"steps": 12, "lr": 5e-3, "warmup": 3, "eval_every": 4, "checkpoint_every": 4, "progress": False}
    evals = {"eval_fn": lambda m: {"w": float(m.out.weight.sum())}}
    full_model = tiny()
    full = train(full_model, repeat_source(), checkpoint_dir=tmp_path / "full", **kwargs, **evals)

    source = repeat_source()

    def interrupted(step: int) -> Batch:
        if step == 7:
            raise Interrupt
        return source(step)

    with pytest.raises(Interrupt):
        train(tiny(), interrupted, checkpoint_dir=tmp_path / "run", **kwargs, **evals)
    torch.manual_seed(1234)  # the resumed process's RNG and initial weights differ: the checkpoint restores them
    resumed_model = tiny(seed=99)
    resumed = train(resumed_model, source, checkpoint_dir=tmp_path / "run", resume=True, **kwargs, **evals)
    assert [r.loss for r in resumed.history] == [r.loss for r in full.history]
    assert [(r.step, r.lr) for r in resumed.history] == [(r.step, r.lr) for r in full.history]
    assert resumed.evals == full.evals
    for a, b in zip(full_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoints_hold_no_pickle(tmp_path: Path) -> None:
    train(tiny(), repeat_source(), steps=6, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "latest.json",
        "step-00000004.json",
        "step-00000004.safetensors",
        "step-00000006.json",
        "step-00000006.safetensors",
    ]  # the newest two are kept
    record = json.loads((tmp_path / "step-00000006.json").read_text())  # plain JSON and safetensors, nothing else
    tensors = load_tensors((tmp_path / "step-00000006.safetensors").read_bytes())
    assert record["step"] == 6 and len(record["state"]["history"]) == 6
    assert {k.split("/")[0] for k in tensors} == {"model", "optimizer", "rng"}
    assert "optimizer/0/exp_avg" in tensors and "optimizer/0/step" in tensors
    assert record["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.95]
    for path in tmp_path.iterdir():
        assert not path.read_bytes().startswith(b"\x80")  # no pickle protocol header anywhere
    assert not list(tmp_path.glob(".*.tmp"))


def test_missing_or_corrupted_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        train(tiny(), repeat_source(), steps=2, checkpoint_dir=tmp_path, resume=True, progress=False)
    train(tiny(), repeat_source(), steps=2, checkpoint_dir=tmp_path, progress=False)
    tensors = tmp_path / "step-00000002.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        read_checkpoint(tmp_path)
    tensors.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        read_checkpoint(tmp_path)
    (tmp_path / "step-00000002.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        read_checkpoint(tmp_path)
    other = tmp_path / "other"
    train(tiny(), repeat_source(), steps=1, checkpoint_dir=other, progress=False)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        train(TinyLM(dim=16), repeat_source(), steps=2, checkpoint_dir=other, resume=True, progress=False)


# --- the train command (the real model, narrowed so that it trains here in a moment) -------------------------------


#: a narrow one-layer version of a shipped spec, so the real TitansLM trains here in a second
NARROW = ("model.dim=32", "memory.head_dim=16", "memory.heads=1", "attention.heads=2", "blocks.0.repeat=1")


def invoke(runner, out: Path, *args: str):
    from tests.helpers import SPECS
    from titans_compose.cli.main import cli

    small = ["--seq-len", "32", "--batch", "2", "--max-mb", "0.2", "--no-progress", "--eval-batches", "1"]
    sets = [arg for item in NARROW for arg in ("--set", item)]
    return runner.invoke(cli, ["train", str(SPECS / "titans_mac_small.yaml"), "-o", str(out), *small, *sets, *args])


def test_cli_trains_and_writes_metrics(runner, tmp_path: Path) -> None:
    result = invoke(runner, tmp_path, "--steps", "6", "--eval-every", "3")
    assert result.exit_code == 0, result.output
    assert "trained 6 steps: lm on python stdlib" in result.output and "val_bits_per_byte" in result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["step"] for r in metrics["history"]] == list(range(1, 7))
    assert [s for s, _ in metrics["evals"]] == [3, 6]
    final = metrics["final"]
    assert final["val_bits_per_byte"] == pytest.approx(final["val_loss"] / math.log(2))
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,tokens_per_s,val_bits_per_byte,val_loss" and len(rows) == 7
    assert (tmp_path / "build" / "manifest.json").is_file() and (tmp_path / "checkpoints" / "latest.json").is_file()


def test_cli_resume_continues_the_run_with_its_settings(runner, tmp_path: Path) -> None:
    assert invoke(runner, tmp_path, "--steps", "4", "--weight-decay", "0.05", "--warmup", "1").exit_code == 0
    first = json.loads((tmp_path / "metrics.json").read_text())["history"]
    result = invoke(runner, tmp_path, "--steps", "4")
    assert result.exit_code == 2 and "Invalid value for '--out'" in result.output and "--resume" in result.output
    result = invoke(runner, tmp_path, "--steps", "4", "--resume", "--weight-decay", "0.2")
    assert result.exit_code == 2 and "--weight-decay 0.2 (the run has 0.05)" in result.output
    result = invoke(runner, tmp_path, "--resume", "--steps", "7")  # --weight-decay and --warmup are the run's
    assert result.exit_code == 0, result.output
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert [r["step"] for r in history] == list(range(1, 8)) and history[:4] == first


@pytest.mark.parametrize(("task", "loss_on"), [("passkey", "answer"), ("mqar", "all")])
def test_cli_tasks_report_accuracy(runner, tmp_path: Path, task: str, loss_on: str) -> None:
    result = invoke(runner, tmp_path, "--task", task, "--steps", "2", "--seq-len", "160", "--loss-on", loss_on)
    assert result.exit_code == 0, result.output
    final = json.loads((tmp_path / "metrics.json").read_text())["final"]
    assert set(final) == {"val_answer_loss", "val_accuracy"} and 0.0 <= final["val_accuracy"] <= 1.0


def test_cli_errors_name_the_option(runner, tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\0" * 64)
    cases = [
        (["--data", str(tmp_path / "missing")], "'--data'"),
        (["--data", str(tmp_path / "bin")], "'--data': "),
        (["--task", "passkey", "--seq-len", "20"], "'--seq-len'"),
        (["--task", "mqar", "--pairs", "2", "--queries", "3"], "'--queries'"),
        (["--resume"], "'--resume'"),
        (["--steps", "0"], "'--steps'"),
        (["--lr", "0"], "'--lr'"),
    ]
    for args, option in cases:
        result = invoke(runner, tmp_path / "run", *args)
        assert result.exit_code == 2 and f"Invalid value for {option}" in result.output, (args, result.output)
    result = invoke(runner, tmp_path / "typo", "--resume")
    assert result.exit_code == 2 and "no such directory" in result.output
    assert not (tmp_path / "typo").exists()  # a mistyped --resume directory is not created


# --- the real model in the loop ---------------------------------------------------------------------------------


def test_titans_lm_resumes_bit_exactly(tmp_path: Path) -> None:
    from tests.helpers import SPECS
    from titans_compose.builder import build

    def model(seed: int) -> torch.nn.Module:
        return build(SPECS / "titans_mac_small.yaml", NARROW, seed=seed, smoke=False).module

    source = repeat_source(batch=2, seq_len=32)
    kwargs = {"steps": 4, "lr": 3e-3, "checkpoint_every": 2, "progress": False}
    full = train(model(0), source, **kwargs)

    def interrupted(step: int) -> Batch:
        if step == 3:
            raise Interrupt
        return source(step)

    with pytest.raises(Interrupt):
        train(model(0), interrupted, checkpoint_dir=tmp_path, **kwargs)
    resumed = train(model(1), source, checkpoint_dir=tmp_path, resume=True, **kwargs)
    assert [r.loss for r in resumed.history] == [r.loss for r in full.history]
    assert full.history[-1].loss < full.history[0].loss


# --- faults, concurrency and bad input in the train command -----------------------------------------------------


def test_a_second_run_into_a_held_run_directory_is_refused(runner, tmp_path: Path) -> None:
    """Another process holds the run's lock: a second run is refused (exit 1) before it writes anything there."""
    import fcntl

    from titans_compose.lock import LOCK_FILE

    with open(tmp_path / LOCK_FILE, "w") as held:  # an open file description of its own, as another process has
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        result = invoke(runner, tmp_path, "--steps", "2")
        assert result.exit_code == 1, result.output
        assert f"{tmp_path} is in use by another titans-compose train run (process 4242)" in result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
    # the holder's end releases the lock (the OS does so for a killed holder too): the run goes ahead
    assert invoke(runner, tmp_path, "--steps", "2").exit_code == 0


def test_concurrent_runs_and_a_kill_in_real_processes(tmp_path: Path) -> None:
    """A real run holds its directory; a second process is refused; after a SIGKILL the lock is gone and --resume
    continues from the last checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT, SPECS

    sets = [arg for item in NARROW for arg in ("--set", item)]
    base = [sys.executable, "-m", "titans_compose.cli.main", "train", str(SPECS / "titans_mac_small.yaml")]
    args = [*base, "-o", str(tmp_path), "--seq-len", "32", "--batch", "2", "--max-mb", "0.05", "--no-progress"]
    args += ["--eval-batches", "1", "--eval-every", "1", *sets]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([*args, "--steps", "100000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "checkpoints" / "latest.json").is_file():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.1)
        second = subprocess.run([*args, "--steps", "2"], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "is in use by another titans-compose train run" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["checkpoint"]
    done = int(latest.removeprefix("step-").removesuffix(".json"))
    resumed = subprocess.run(
        [*args, "--resume", "--steps", str(done + 1)], env=env, capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert [r["step"] for r in history] == list(range(1, done + 2))


def kill_during_build(out: Path) -> None:
    """What a run killed while writing its build leaves: its config, part of the build and an atomic-write
    temporary (no manifest, no checkpoint)."""
    build_dir = out / "build"
    (build_dir / "spec.resolved.yaml").write_text("model: {}\n")
    (build_dir / ".weights.safetensors.k1ll3d.tmp").write_bytes(b"\0" * 10)


def kill_during_checkpoint(out: Path) -> None:
    """What a run killed while checkpointing leaves: its build rewritten in part (the manifest is removed first),
    a checkpoint's temporary, and a newer checkpoint's step files written but never put in force."""
    (out / "build" / "manifest.json").unlink()
    (out / "build" / ".graph.dot.k1ll3d.tmp").write_text("digraph {")
    (out / "checkpoints" / ".step-00000004.safetensors.k1ll3d.tmp").write_bytes(b"\0" * 10)
    (out / "checkpoints" / "step-00000004.safetensors").write_bytes(b"\0" * 10)


@pytest.mark.parametrize("stage", ["build", "checkpoint"])
def test_resume_works_after_a_kill_at_each_write_stage(runner, tmp_path: Path, stage: str) -> None:
    first = invoke(runner, tmp_path, "--steps", "2", "--eval-every", "1")
    assert first.exit_code == 0, first.output
    if stage == "build":  # killed before its first checkpoint: only its config.json and a part of the build
        config = (tmp_path / "config.json").read_text()
        for path in ("build", "checkpoints", "metrics.json", "metrics.csv"):
            target = tmp_path / path
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        (tmp_path / "build").mkdir()
        (tmp_path / "config.json").write_text(config)
        kill_during_build(tmp_path)
    else:
        kill_during_checkpoint(tmp_path)
    result = invoke(runner, tmp_path, "--resume", "--steps", "4")
    assert result.exit_code == 0, result.output
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert not list(tmp_path.rglob("*.tmp"))
    assert (tmp_path / "build" / "manifest.json").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest.json",
        "step-00000003.json",
        "step-00000003.safetensors",
        "step-00000004.json",
        "step-00000004.safetensors",
    ]


def test_resume_works_after_a_full_disk_while_writing_the_build(runner, tmp_path: Path, monkeypatch) -> None:
    import errno

    import titans_compose.manifest

    assert invoke(runner, tmp_path, "--steps", "2").exit_code == 0
    real = titans_compose.manifest.atomic_write

    def fills_up(path, data):
        if Path(path).name == "graph.dot":  # after the manifest is removed and some files are rewritten
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(titans_compose.manifest, "atomic_write", fills_up)
        full = invoke(runner, tmp_path, "--resume", "--steps", "3")
    assert full.exit_code == 1 and "No space left on device" in full.output, full.output
    assert not (tmp_path / "build" / "manifest.json").exists()
    result = invoke(runner, tmp_path, "--resume", "--steps", "3")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in json.loads((tmp_path / "metrics.json").read_text())["history"]] == [1, 2, 3]


def test_a_foreign_build_folder_is_still_refused(runner, tmp_path: Path) -> None:
    """Only what a killed build leaves is cleared: a build/ holding other files is the user's and stays."""
    (tmp_path / "build").mkdir(parents=True)
    (tmp_path / "build" / "notes.txt").write_text("mine")
    result = invoke(runner, tmp_path, "--steps", "2")
    assert result.exit_code == 1 and "refusing to write into it" in result.output
    assert (tmp_path / "build" / "notes.txt").read_text() == "mine" and not (tmp_path / "config.json").exists()


def test_remove_interrupted_keeps_the_checkpoint_in_force(tmp_path: Path) -> None:
    train(tiny(), repeat_source(), steps=2, checkpoint_dir=tmp_path, checkpoint_every=1, progress=False)
    kept = sorted(p.name for p in tmp_path.iterdir())
    (tmp_path / ".latest.json.x.tmp").write_text("{")
    (tmp_path / "step-00000003.json").write_text("{}")
    removed = remove_interrupted(tmp_path)
    assert [p.name for p in removed] == [".latest.json.x.tmp", "step-00000003.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == kept
    (tmp_path / "latest.json").write_text("not json")  # a damaged pointer: no step file is judged by it
    assert remove_interrupted(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == kept


def test_resume_records_the_new_steps_in_config_json(runner, tmp_path: Path) -> None:
    assert invoke(runner, tmp_path, "--steps", "2").exit_code == 0
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 2
    assert invoke(runner, tmp_path, "--resume", "--steps", "3").exit_code == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["steps"] == 3 and json.loads((tmp_path / "metrics.json").read_text())["config"] == config
    # a later --resume without --steps continues to the recorded 3: nothing left to train, the history stays
    assert invoke(runner, tmp_path, "--resume").exit_code == 0
    assert [r["step"] for r in json.loads((tmp_path / "metrics.json").read_text())["history"]] == [1, 2, 3]


def test_a_full_disk_is_a_user_error_naming_the_file(runner, tmp_path: Path, monkeypatch) -> None:
    import errno
    import os

    import titans_compose.io

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(titans_compose.io.os, "fsync", full)
    result = invoke(runner, tmp_path, "--steps", "2")
    assert result.exit_code == 1, result.output
    assert f"error: No space left on device: {tmp_path / 'config.json'}" in result.output
    assert "internal error" not in result.output and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "model.vocab_size=100"], "model.vocab_size is 100, but the training data (lm on python stdlib"),
        (["--task", "mqar", "--seq-len", "160", "--set", "model.vocab_size=120"], "byte values up to 122"),
    ],
)
def test_a_vocabulary_below_the_data_bytes_is_a_user_error(runner, tmp_path: Path, args, message) -> None:
    result = invoke(runner, tmp_path, "--steps", "1", *args)
    assert result.exit_code == 1 and message in result.output and "internal error" not in result.output


def test_a_forced_triton_backend_without_the_interpreter_is_a_user_error(runner, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TITANS_COMPOSE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    result = invoke(runner, tmp_path, "--steps", "1")  # the build's smoke check runs on the CPU, even with a GPU
    assert result.exit_code == 1, result.output
    assert "error: TITANS_COMPOSE_BACKEND=triton on CPU tensors needs Triton's interpreter" in result.output
    assert "internal error" not in result.output


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--lr", "nan"], "'--lr'"),
        (["--lr", "inf"], "'--lr'"),
        (["--weight-decay", "nan"], "'--weight-decay'"),
        (["--grad-clip", "inf"], "'--grad-clip'"),
        (["--max-mb", "inf"], "'--max-mb'"),
        (["--max-mb", "1e-9"], "'--max-mb'"),
        (["--task", "passkey", "--depth", "nan"], "'--depth'"),
        (["--seed", str(2**64)], "'--seed'"),
        (["--device", "cuda:99"], "'--device'"),
        (["--device", "nonsense"], "'--device'"),
    ],
)
def test_values_torch_would_reject_are_usage_errors(runner, tmp_path: Path, args, option) -> None:
    result = invoke(runner, tmp_path / "run", *args)
    assert result.exit_code == 2 and f"Invalid value for {option}" in result.output, result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(runner, tmp_path: Path) -> None:
    result = invoke(runner, tmp_path, "--device", "cuda")
    assert result.exit_code == 2 and "Invalid value for '--device': 'cuda' cannot be used here" in result.output


# --- bounded, non-blocking reads of --data ------------------------------------------------------------------------


def test_data_files_are_read_only_up_to_the_cap(text_dir: Path, monkeypatch) -> None:
    from titans_compose.train import data as data_module

    requested = []  # the sizes asked of each opened file (io.read_prefix reads at most that many bytes)
    real_read_prefix = data_module.read_prefix

    def read_prefix(fd: int, limit: int) -> bytes:
        requested.append(limit)
        return real_read_prefix(fd, limit)

    monkeypatch.setattr(data_module, "read_prefix", read_prefix)
    corpus = load_corpus(text_dir, max_bytes=100)  # blob.bin (sorted first, not text), then 100 bytes of one file
    assert corpus.train.numel() + corpus.val.numel() == 100 and corpus.files == (1, 0)
    assert requested == [100, 100]


def test_fifos_and_devices_are_skipped_or_refused(runner, tmp_path: Path, text_dir: Path) -> None:
    import os
    import socket

    os.mkfifo(text_dir / "pipe.txt")  # nobody writes it: reading it would block for ever
    os.symlink("/dev/zero", text_dir / "zero.txt")  # reading it would never end
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(text_dir / "sock.txt"))  # cannot even be opened
        corpus = load_corpus(text_dir)
    assert [entry.split(", not a regular file")[0] for entry in corpus.skipped] == [
        f"{text_dir / 'pipe.txt'} is a pipe",
        f"{text_dir / 'sock.txt'} is a socket",
        f"{text_dir / 'zero.txt'} is a character device",
    ]
    assert sum(corpus.files) == 40
    for special in (text_dir / "pipe.txt", Path("/dev/zero")):
        with pytest.raises(DataError, match="give a text file or a directory"):
            load_corpus(special)
    result = invoke(runner, tmp_path / "run", "--data", str(text_dir), "--steps", "1", "--seq-len", "8")
    assert result.exit_code == 0, result.output
    assert f"warning: --data: skipped {text_dir / 'pipe.txt'} is a pipe" in result.output
    result = invoke(runner, tmp_path / "run2", "--data", str(text_dir / "pipe.txt"), "--steps", "1")
    assert result.exit_code == 2 and "Invalid value for '--data'" in result.output and "is a pipe" in result.output
