"""Training: byte corpus and split, the loop (schedule, learning, bit-exact resume), pickle-free checkpoints, CLI."""

from __future__ import annotations

import json
import math
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
    from tests.conftest import SPECS
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


# --- the real model in the loop ---------------------------------------------------------------------------------


def test_titans_lm_resumes_bit_exactly(tmp_path: Path) -> None:
    from tests.conftest import SPECS
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
