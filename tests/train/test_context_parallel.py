"""Context-parallel training (gloo, CPU processes): two ranks, each holding half of every sequence, take the steps
one process takes on the whole sequences; the options that cannot split a sequence are refused by name.

The runs train on pass-key batches with the loss on the answer only, so the first rank's half holds no target: its
tokens reach the loss only through the exchanges, whose backward pass must bring their gradients back. The
evaluation scores held-out pass keys (loss on the answers and exact match, gathered from the ranks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import SPECS, TINY_SHIPPED, free_port, on_gloo_ranks
from titans_compose.builder import build
from titans_compose.nn.context import ContextGroup
from titans_compose.train import train
from titans_compose.train.context import sequence_piece
from titans_compose.train.data import Batch, derive_seed
from titans_compose.train.loop import target_count
from titans_compose.train.run import evaluate
from titans_compose.train.tasks import TaskBatch, passkey_batch
from titans_compose.train.tokens import write_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

NARROW = [*TINY_SHIPPED, "blocks.0.repeat=1"]
SPEC = {"lmm": "titans_lmm_small.yaml", "mal": "titans_mal_small.yaml", "mac": "titans_mac_small.yaml"}
ROWS, LENGTH, STEPS = 4, 48, 3
#: float32, as tests/train/test_distributed.py: the split sums the same terms in another order (a few ulp), which
#: AdamW's first steps can carry into the weights; 1e-5 relative is far below a step's change of the loss
RTOL = 1e-5


def batches(step: int, stream: str = "train") -> TaskBatch:
    seed = derive_seed(stream, step)
    return passkey_batch(ROWS, LENGTH, depth=None, digits=1, filler="repeat", loss_on="answer", seed=seed)


class Stop(RuntimeError):
    """Raised by the batch source to end a run at a step, as a kill after the checkpoint before it would."""


def run(kind: str, stop_at: int | None = None, **options: object) -> dict:
    """Train the tiny model of ``kind`` (the same seed in every process) and evaluate it: the losses and the
    evaluation (none if stopped at step ``stop_at``)."""
    model = build(SPECS / SPEC[kind], NARROW, seed=0, smoke=False).module
    held_out = [batches(i, "val") for i in range(2)]

    def source(step: int) -> TaskBatch:
        if step == stop_at:
            raise Stop(f"stopped at step {step}")
        return batches(step)

    torch.manual_seed(0)
    try:
        result = train(
            model,
            source,
            steps=STEPS,
            lr=3e-3,
            warmup=1,
            progress=False,
            eval_every=STEPS,
            eval_fn=lambda evaluated: evaluate(evaluated, held_out, context=model.context),
            **options,
        )
    except Stop:
        return {"losses": [], "evaluation": {}}
    return {"losses": [r.loss for r in result.history], "evaluation": result.evals[-1][1]}


def _trained(rank: int, world: int, kind: str, options: dict, out: str) -> None:
    result = run(kind, **options)
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def on_ranks(world: int, tmp_path: Path, kind: str, **options: object) -> dict:
    out = tmp_path / f"run-{free_port()}.json"
    on_gloo_ranks(_trained, world, kind, options, str(out))
    return json.loads(out.read_text())


def assert_same_run(split: dict, whole: dict) -> None:
    assert len(whole["losses"]) == STEPS and whole["losses"][0] != whole["losses"][-1]
    assert split["losses"] == pytest.approx(whole["losses"], rel=RTOL)
    assert split["evaluation"] == pytest.approx(whole["evaluation"], rel=RTOL)
    assert set(whole["evaluation"]) == {"val_answer_loss", "val_accuracy"}


@pytest.mark.parametrize("kind", ["lmm", "mal"])
def test_two_ranks_splitting_each_sequence_train_as_one_process(tmp_path: Path, kind: str) -> None:
    """DDP over the two ranks sums their gradients; MAL's persistent tokens enter the first rank's half only, and
    the second rank's gradient for them is zero."""
    assert_same_run(on_ranks(2, tmp_path, kind, context_parallel=2), run(kind))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("mac", {"accumulate": 2, "activation_checkpointing": True}),
        ("mal", {"parallel": "fsdp"}),
    ],
)
def test_split_sequences_with_accumulation_checkpointing_and_fsdp(tmp_path: Path, kind: str, options: dict) -> None:
    """MAC's segments straddle the two halves (segments of 8, halves of 24); layers recomputed in the backward pass
    exchange again; FSDP2 gathers the weights each rank splits by heads."""
    assert_same_run(on_ranks(2, tmp_path, kind, context_parallel=2, **options), run(kind))


@pytest.mark.slow
def test_four_ranks_as_two_data_parallel_groups_of_two(tmp_path: Path) -> None:
    """Ranks 0-1 and 2-3 each split their rows' sequences; the two groups take half of the rows each."""
    assert_same_run(on_ranks(4, tmp_path, "lmm", context_parallel=2), run("lmm"))


@pytest.mark.slow
def test_a_split_run_stopped_after_a_checkpoint_resumes_in_one_process(tmp_path: Path) -> None:
    """The checkpoint of a split run is the whole model's: one process resumes it and goes on as the uninterrupted
    run."""
    checkpoints = {"checkpoint_dir": tmp_path / "checkpoints", "checkpoint_every": 1}
    stopped = on_ranks(2, tmp_path, "lmm", stop_at=STEPS, context_parallel=2, **checkpoints)
    assert stopped["losses"] == [] and (tmp_path / "checkpoints" / "step-00000002.json").is_file()
    assert_same_run(run("lmm", resume=True, **checkpoints), run("lmm"))


def test_each_rank_scores_the_targets_of_its_half() -> None:
    """A piece's model input is its half; its batch adds the next half's first token, the target of its last
    logit, so the halves' targets (and masks and answers) are exactly the whole batch's."""
    batch = batches(1)
    pieces = [sequence_piece(batch, ContextGroup(None, rank, 2)) for rank in range(2)]
    assert torch.equal(torch.cat([p.inputs for p in pieces], 1), batch.tokens)
    assert [p.batch.tokens.shape[1] for p in pieces] == [LENGTH // 2 + 1, LENGTH // 2]
    for field in ("tokens", "loss_mask", "answer_group"):
        whole = getattr(batch, field)[:, 1:]
        halves = torch.cat([getattr(p.batch, field)[:, 1:] for p in pieces], 1)
        assert torch.equal(halves, whole), field
    assert sum(target_count(p.batch) for p in pieces) == target_count(batch) > 0
    assert target_count(pieces[0].batch) == 0  # the answer ends the sequence
    assert sequence_piece(batch, None).inputs is None
    with pytest.raises(ValueError, match="48 tokens does not split into 5 equal pieces"):
        sequence_piece(batch, ContextGroup(None, 0, 5))
    with pytest.raises(ValueError, match=r"packed documents \(cu_seqlens\) are not supported"):
        sequence_piece(Batch(batch.tokens[:1], cu_seqlens=torch.tensor([0, 20, LENGTH])), ContextGroup(None, 0, 2))


def test_a_model_that_cannot_split_is_refused_before_any_process_group() -> None:
    model = build(SPECS / SPEC["lmm"], [*NARROW, "memory.heads=1"], seed=0, smoke=False).module
    with pytest.raises(ValueError, match=r"over 2 ranks: L0\.memory has 1 heads, which do not split over 2 ranks"):
        train(model, batches, steps=1, progress=False, context_parallel=2)
    with pytest.raises(ValueError, match=r"does not run under torch\.compile"):
        train(model, batches, steps=1, progress=False, context_parallel=2, compile=True)
    with pytest.raises(ValueError, match="needs a multiple of 2 processes"):
        train(build(SPECS / SPEC["lmm"], NARROW, smoke=False).module, batches, steps=1, context_parallel=2)


# ------------------------------------------------------------------------------------------------ the command


def test_context_parallel_options_that_cannot_work_are_named(runner, tmp_path: Path) -> None:
    """(Packed documents and heads that do not split are refused once there are enough processes: see the torchrun
    test.)"""
    from titans_compose.cli.main import cli

    cases = [
        (["--seq-len", "25"], "'--seq-len': 25 tokens do not split into --context-parallel 2 equal pieces"),
        (["--compile"], "'--context-parallel': context parallelism does not run under --compile"),
        ([], "over 2 ranks needs a multiple of 2 processes (torchrun --nproc_per_node); there are 1"),
    ]
    for args, message in cases:
        command = ["train", str(SPECS / SPEC["lmm"]), "-o", str(tmp_path / "run"), "--no-progress"]
        result = runner.invoke(cli, [*command, "--context-parallel", "2", "--seq-len", "32", *args])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (args, result.output)


CLI_ARGS = ["--seq-len", "32", "--max-mb", "0.2", "--no-progress", "--eval-batches", "1", "--eval-every", "2"]


def cli_train(out: Path, ranks: int, *args: str) -> subprocess.CompletedProcess:
    """``titans-compose train`` on the tiny LMM model, under torchrun with ``ranks`` CPU processes (or plain)."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    command = [sys.executable, *(launcher if ranks > 1 else []), "-m", "titans_compose", "train"]
    sets = [a for s in NARROW for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [*command, str(SPECS / SPEC["lmm"]), "-o", str(out), *CLI_ARGS, *sets, *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_torchrun_context_parallel_run_has_the_losses_of_one_process(tmp_path: Path) -> None:
    """torchrun with 2 ranks and --context-parallel 2 (one group: both ranks take the whole batch of 4, each half of
    every sequence) logs the losses and evaluation of one process; a spec whose heads do not split is refused on
    every rank, naming the layer."""
    whole = cli_train(tmp_path / "whole", 1, "--batch", "4", "--steps", "4")
    assert whole.returncode == 0, whole.stderr
    split = cli_train(tmp_path / "split", 2, "--batch", "4", "--steps", "4", "--context-parallel", "2")
    assert split.returncode == 0, split.stderr
    assert "x 2 ranks (ddp, context parallel 2)" in split.stderr
    config = json.loads((tmp_path / "split" / "config.json").read_text())
    assert (config["world_size"], config["global_batch"], config["context_parallel"]) == (2, 4, 2)
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("split", "whole")]
    losses = [[r["loss"] for r in m["history"]] for m in metrics]
    assert len(losses[1]) == 4 and losses[0] == pytest.approx(losses[1], rel=RTOL)
    assert metrics[0]["final"] == pytest.approx(metrics[1]["final"], rel=RTOL)
    refused = cli_train(tmp_path / "odd", 2, "--context-parallel", "2", "--set", "memory.heads=1")
    assert refused.returncode != 0 and "L0.memory has 1 heads, which do not split over 2 ranks" in refused.stderr
    write_tokens(tmp_path / "t.bin", np.arange(4000) % 7, vocab_size=7, separator=0)
    refused = cli_train(tmp_path / "packed", 2, "--context-parallel", "2", "--tokens", str(tmp_path / "t.bin"))
    assert refused.returncode != 0 and "documents are packed" in refused.stderr
