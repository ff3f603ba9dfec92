"""Data-parallel training over torch.distributed (gloo, two CPU processes): two ranks with B rows each take the
steps one process takes with 2B rows, with DDP and FSDP2; a run stopped after a checkpoint resumes on any number of
ranks and goes on as the uninterrupted run."""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.helpers import SPECS, free_port, on_gloo_ranks
from titans_compose.builder import build
from titans_compose.train import train
from titans_compose.train.data import Batch, WindowSampler
from titans_compose.train.distributed import World, micro_batches, wrap

pytestmark = pytest.mark.usefixtures("one_thread")

NARROW = ["model.dim=32", "memory.head_dim=16", "memory.heads=1", "attention.heads=2", "blocks.0.repeat=1"]
#: the global batch every run sees: 4 rows of 24 bytes (2 per rank on two ranks)
ROWS, LENGTH, STEPS = 4, 24, 4
#: float32 losses summed over the ranks instead of over one batch: the order of the sums differs (a few ulp), and
#: AdamW's first steps (update ~ lr * sign of the gradient) can carry that into the weights; 1e-5 relative is far
#: below the change of the loss from one step to the next (~1e-2)
RTOL = 1e-5


class Stop(RuntimeError):
    """Raised by a batch source to end a run at a step, as a kill after the checkpoint before it would."""


def source(stop_at: int | None = None):
    """The global batch of each step (the same in every process), optionally failing at step ``stop_at``."""
    text = torch.arange(4096, dtype=torch.long) * 7 % 251
    sampler = WindowSampler(text.to(torch.uint8), ROWS, LENGTH, seed=5)

    def batches(step: int) -> Batch:
        if step == stop_at:
            raise Stop(f"stopped at step {step}")
        return sampler(step)

    return batches


def run(
    parallel: str, checkpoint_dir: Path | None, resume: bool, stop_at: int | None, **options: object
) -> list[float]:
    """Train the tiny LMM model (same seed in every process; ``options``: more of train's) and return the loss of
    every step so far."""
    model = build(SPECS / "titans_lmm_small.yaml", NARROW, seed=0, smoke=False).module
    torch.manual_seed(0)
    try:
        result = train(
            model,
            source(stop_at),
            steps=STEPS,
            lr=3e-3,
            warmup=1,
            progress=False,
            parallel=parallel,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=2,
            resume=resume,
            **options,
        )
    except Stop:
        return []
    return [r.loss for r in result.history]


def _losses(rank: int, world: int, args: tuple, options: dict, out: str) -> None:
    losses = run(*args, **options)
    if rank == 0:
        Path(out).write_text(json.dumps(losses))


def _gathered_layers(rank: int, world: int, out: str) -> None:
    """Record which layers' parameters are gathered (plain tensors, not shards) as each layer starts, and after
    the backward pass, with FSDP over ``world`` ranks."""
    model = build(SPECS / "titans_lmm_small.yaml", [*NARROW[:-1], "blocks.0.repeat=3"], seed=0, smoke=False).module
    root = wrap(model, "fsdp", World(rank, world))
    blocks = model.layer_runners
    seen = []

    def gathered() -> list[bool]:
        return [not isinstance(next(b.parameters()), DTensor) for b in blocks]

    for block in blocks:
        block.register_forward_pre_hook(lambda *_: seen.append(gathered()))
    root(torch.randint(256, (1, 24))).logits.sum().backward()
    seen.append([*gathered(), not isinstance(model.nodes["embed"].embedding.weight, DTensor)])
    if rank == 0:
        Path(out).write_text(json.dumps(seen))


def test_fsdp_gathers_one_layer_at_a_time(tmp_path: Path) -> None:
    out = tmp_path / "gathered.json"
    on_gloo_ranks(_gathered_layers, 2, str(out))
    on_entry = [[True, False, False], [False, True, False], [False, False, True]]
    assert json.loads(out.read_text()) == [*on_entry, [False, False, False, False]]


def on_ranks(world: int, tmp_path: Path, *args: object, **options: object) -> list[float]:
    """``run(*args, **options)`` on ``world`` spawned gloo ranks (one: in this process, without a process group)."""
    if world == 1:
        return run(*args, **options)
    out = tmp_path / f"losses-{free_port()}.json"
    on_gloo_ranks(_losses, world, args, options, str(out))
    return json.loads(out.read_text())


def test_ranks_take_their_rows_of_the_global_batch_in_order() -> None:
    batch = Batch(torch.arange(24).reshape(12, 2), torch.ones(12, 2, dtype=torch.bool))
    parts = [micro_batches(batch, World(rank, 2), 3) for rank in (0, 1)]
    assert [p.tokens.shape[0] for ps in parts for p in ps] == [2] * 6
    torch.testing.assert_close(torch.cat([p.tokens for ps in parts for p in ps]), batch.tokens)
    assert all(p.loss_mask.shape == p.tokens.shape for ps in parts for p in ps)
    with pytest.raises(ValueError, match="12 rows does not split into 5 ranks x 1"):
        micro_batches(batch, World(0, 5), 1)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path: Path, parallel: str) -> None:
    one = on_ranks(1, tmp_path, parallel, None, False, None)
    two = on_ranks(2, tmp_path, parallel, None, False, None)
    assert len(one) == STEPS and one[0] != one[-1]
    assert two == pytest.approx(one, rel=RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_accumulation_and_checkpointing_on_ranks_equal_one_plain_process(tmp_path: Path, parallel: str) -> None:
    """2 ranks x 2 micro-batches of 1 row (gradients synchronised on the last only), layers checkpointed (and, under
    FSDP, sharded): the steps of one plain process with 4 rows."""
    one = on_ranks(1, tmp_path, "ddp", None, False, None)
    two = on_ranks(2, tmp_path, parallel, None, False, None, accumulate=2, activation_checkpointing=True)
    assert two == pytest.approx(one, rel=RTOL)


@pytest.mark.slow
@pytest.mark.parametrize(("parallel", "worlds"), [("ddp", (2, 1)), ("fsdp", (2, 2)), ("fsdp", (1, 2))])
def test_a_stopped_run_resumes_on_any_number_of_ranks(tmp_path: Path, parallel: str, worlds: tuple[int, int]) -> None:
    """Stopped at step 3 (after the checkpoint of step 2) on ``worlds[0]`` ranks, resumed on ``worlds[1]``: the
    checkpoint holds whole tensors (gathered from FSDP2's shards), so any number of ranks restores it."""
    whole = on_ranks(1, tmp_path, parallel, None, False, None)
    ckpt = tmp_path / "checkpoints"
    assert on_ranks(worlds[0], tmp_path, parallel, ckpt, False, 3) == []
    assert json.loads((ckpt / "latest.json").read_text())["checkpoint"] == "step-00000002.json"
    resumed = on_ranks(worlds[1], tmp_path, parallel, ckpt, True, None)
    assert resumed == pytest.approx(whole, rel=RTOL)


CLI_NARROW = [arg for item in NARROW for arg in ("--set", item)]
CLI_SMALL = ["--seq-len", "32", "--max-mb", "0.2", "--no-progress", "--eval-batches", "1", "--eval-every", "2"]


def cli_train(out: Path, ranks: int, *args: str) -> subprocess.CompletedProcess:
    """``titans-compose train`` on the tiny LMM model, under torchrun with ``ranks`` CPU processes (or plain)."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    command = [sys.executable, *(launcher if ranks > 1 else []), "-m", "titans_compose", "train"]
    spec = str(SPECS / "titans_lmm_small.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, spec, "-o", str(out), *CLI_SMALL, *CLI_NARROW, *args], capture_output=True, text=True, env=env
    )


def history(out: Path) -> list[float]:
    return [r["loss"] for r in json.loads((out / "metrics.json").read_text())["history"]]


@pytest.mark.slow
def test_torchrun_cli_run_resumes_in_one_process(tmp_path: Path) -> None:
    """torchrun with 2 ranks x --batch 2 for 3 steps, resumed in one process with --batch 4 to step 5, goes as one
    process with --batch 4 does (3 steps, resumed to 5: the schedule spans --steps); only rank 0 wrote."""
    for args in (["--steps", "3"], ["--steps", "5", "--resume"]):
        done = cli_train(tmp_path / "whole", 1, "--batch", "4", *args)
        assert done.returncode == 0, done.stderr
    first = cli_train(tmp_path / "run", 2, "--batch", "2", "--steps", "3", "--parallel", "fsdp")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("trained 3 steps") == 1 and "x 2 ranks (fsdp)" in first.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["world_size"], config["global_batch"], config["parallel"]) == (2, 4, "fsdp")
    wrong = cli_train(tmp_path / "run", 1, "--resume", "--steps", "5")
    assert wrong.returncode == 2 and "global batch of 4 sequences" in wrong.stderr, wrong.stderr
    resumed = cli_train(tmp_path / "run", 1, "--resume", "--steps", "5", "--batch", "4")
    assert resumed.returncode == 0, resumed.stderr
    assert len(history(tmp_path / "run")) == 5
    assert history(tmp_path / "run") == pytest.approx(history(tmp_path / "whole"), rel=RTOL)


@pytest.mark.slow
def test_a_killed_torchrun_run_resumes_in_one_process(tmp_path: Path) -> None:
    """SIGKILL to torchrun and both ranks once the step-2 checkpoint is in force; `--resume` in one process with the
    whole batch goes on as one uninterrupted process (both on the 12-step schedule)."""
    whole = cli_train(tmp_path / "whole", 1, "--batch", "4", "--steps", "12")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "run"
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    args = [str(SPECS / "titans_lmm_small.yaml"), "-o", str(out), *CLI_SMALL, *CLI_NARROW, "--batch", "2"]
    command = [sys.executable, *launcher, "-m", "titans_compose", "train", *args, "--steps", "12"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pointer = out / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 300
    while not pointer.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not (out / "metrics.json").exists(), "the run ended before the kill"
    resumed = cli_train(out, 1, "--resume", "--batch", "4")
    assert resumed.returncode == 0, resumed.stderr
    assert history(out) == pytest.approx(history(tmp_path / "whole"), rel=RTOL)


def _record_exit(out: str, rank: int) -> None:
    Path(out, f"exit-{rank}").write_text(repr(time.time()))


def _rank_0_finishes_late(rank: int, world: int, out: str) -> None:
    atexit.register(_record_exit, out, rank)
    if rank == 0:  # as rank 0 writing the last checkpoint while the others are done
        time.sleep(1.0)
        Path(out, "rank-0-done").write_text(repr(time.time()))


def test_no_rank_leaves_the_group_before_the_others_are_done(tmp_path: Path) -> None:
    """The spawned ranks leave through a barrier: rank 1, done at once, exits only after rank 0's late work (without
    the barrier it left a second early, tearing the group down under rank 0, and in one CI run aborted)."""
    on_gloo_ranks(_rank_0_finishes_late, 2, str(tmp_path))
    done = float((tmp_path / "rank-0-done").read_text())
    assert float((tmp_path / "exit-1").read_text()) >= done
