"""A small training loop: AdamW, linear warm-up then cosine decay, gradient clipping, evaluation and checkpoints.

The model contract is the one every titans_compose language model follows: ``model(tokens)`` with a long tensor
[B, T] returns an object with ``.logits`` [B, T, V]. Batches come from a function of the step number (see
:class:`~titans_compose.train.data.WindowSampler`), so a resumed run sees exactly the batches an uninterrupted
run sees; with the model, optimizer and RNG states restored from the checkpoint, its losses are bit-identical.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from titans_compose.ops.memory.finite import MemoryDivergedError
from titans_compose.train.checkpoint import load_checkpoint, save_checkpoint
from titans_compose.train.context import Piece, sequence_piece, split_world
from titans_compose.train.data import Batch
from titans_compose.train.distributed import Parallel, World, all_sum, full_tensor, gradient_sync, step_batches
from titans_compose.train.precision import MixedPrecision
from titans_compose.train.prepare import prepare

#: the learning rate at the end of the cosine decay, as a fraction of the peak
FINAL_LR_FRACTION = 0.1

BatchSource = Callable[[int], Batch]
EvalFn = Callable[[torch.nn.Module], dict[str, float]]


class TrainingError(RuntimeError):
    """Training cannot go on (the loss, a gradient or a memory state is not finite); the message says at which step
    (and, for a memory, which layer and token)."""


NO_TARGET = "the batch's loss mask selects no target token"


@dataclass(frozen=True)
class StepRecord:
    """One optimisation step: its number (1-based), the training loss, the learning rate used, and the tokens per
    second of the whole step (making the batch, forward, backward and update)."""

    step: int
    loss: float
    lr: float
    tokens_per_s: float


@dataclass
class TrainResult:
    """The per-step history, the evaluations as ``(step, metrics)``, and the last checkpoint written (if any)."""

    history: list[StepRecord] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    checkpoint: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"history": [asdict(r) for r in self.history], "evals": [[s, m] for s, m in self.evals]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        return cls([StepRecord(**r) for r in data["history"]], [(s, dict(m)) for s, m in data["evals"]])

    def recent(self, n: int = 10) -> tuple[float, float]:
        """The mean training loss and tokens per second of the last ``n`` steps (at least one step must exist)."""
        tail = self.history[-n:]
        return sum(r.loss for r in tail) / len(tail), sum(r.tokens_per_s for r in tail) / len(tail)


def lr_at(step: int, *, lr: float, warmup: int, steps: int) -> float:
    """The learning rate for 1-based ``step``: linear warm-up over ``warmup`` steps to ``lr``, then a cosine decay
    reaching ``FINAL_LR_FRACTION * lr`` at ``steps``."""
    if step <= warmup:
        return lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on the weights of linear and convolution layers only; none on
    embeddings, biases, norm gains, persistent tokens, the memory's initial weights or gate biases (decaying those
    towards zero changes what they mean rather than regularising). A weight shared by an embedding and an output
    layer (tied weights) counts as an embedding."""
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, layers)}
    decayed -= {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # each shared parameter once, in registration order
        if p.requires_grad:
            (decay if id(p) in decayed else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def next_token_loss_sum(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
    """The summed next-token cross entropy (nats) of ``logits`` [B, T', V] on ``batch`` [B, T] over the targets
    ``loss_mask`` selects (every token from position 1 on without a mask), and how many targets that is. The logits
    are those of the batch's first T' >= T - 1 tokens: all T, or, for a context-parallel piece
    (:func:`~titans_compose.train.context.sequence_piece`), all but the last, the next piece's first token."""
    tokens = batch.tokens.to(logits.device)
    flat = logits[:, : tokens.shape[1] - 1].reshape(-1, logits.shape[-1])
    flat = flat if flat.dtype == torch.float64 else flat.float()  # at least float32, float64 kept
    losses = F.cross_entropy(flat, tokens[:, 1:].reshape(-1), reduction="none")
    if batch.loss_mask is None:
        return losses.sum(), losses.numel()
    mask = batch.loss_mask[:, 1:].reshape(-1).to(logits.device)
    return losses[mask].sum(), int(mask.sum())


def next_token_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean next-token cross entropy (nats per token) of ``logits`` [B, T, V] on ``batch``, over the targets
    ``loss_mask`` selects (every token from position 1 on without a mask)."""
    total, count = next_token_loss_sum(logits, batch)
    if not count:
        raise TrainingError(NO_TARGET)
    return total / count


def batch_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The logits [B, T, V] of ``model`` on ``batch``, run on the model's device. Packed documents (the batch's
    ``cu_seqlens`` over its rows laid end to end) each run as a stream of their own from a fresh state, documents
    of equal length together as the rows of one call (rows never interact), so a batch without separators costs
    one call as before."""
    tokens = batch.tokens.to(next(model.parameters()).device)
    if batch.cu_seqlens is None:
        return model(tokens).logits
    rows, length = tokens.shape
    flat = tokens.reshape(rows * length)
    bounds = batch.cu_seqlens.tolist()
    if bounds[:1] != [0] or bounds[-1] != rows * length or sorted(bounds) != bounds:
        raise ValueError(f"cu_seqlens must run from 0 to {rows * length} (the batch's tokens) and rise, got {bounds}")
    starts_by_length: dict[int, list[int]] = {}
    for start, end in itertools.pairwise(bounds):
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)
    positions, pieces = [], []
    for n, starts in starts_by_length.items():
        index = (torch.tensor(starts)[:, None] + torch.arange(n)).to(flat.device)
        positions.append(index.flatten())
        pieces.append(model(flat[index]).logits.flatten(0, 1))
    order = torch.cat(positions).argsort()  # back to the tokens' order
    return torch.cat(pieces)[order].view(rows, length, -1)


def piece_logits(model: torch.nn.Module, piece: Piece) -> torch.Tensor:
    """The logits of ``model`` on a rank's ``piece`` of a batch: on its inputs (a context-parallel piece), or on the
    whole batch (:func:`batch_logits`)."""
    if piece.inputs is None:
        return batch_logits(model, piece.batch)
    return model(piece.inputs.to(next(model.parameters()).device)).logits


def lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """:func:`next_token_loss` of ``model`` on ``batch`` (:func:`batch_logits`)."""
    return next_token_loss(batch_logits(model, batch), batch)


def target_count(batch: Batch) -> int:
    """How many next-token targets ``batch`` holds (see :func:`next_token_loss_sum`)."""
    if batch.loss_mask is None:
        return batch.tokens.shape[0] * max(0, batch.tokens.shape[1] - 1)
    return int(batch.loss_mask[:, 1:].sum())


def _diverged_at(step: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, with a memory layer's divergence reported as a :class:`TrainingError` at ``step``."""
    try:
        return fn(*args)
    except MemoryDivergedError as exc:
        raise TrainingError(f"step {step}: {exc}") from exc


def train(
    model: torch.nn.Module,
    batches: BatchSource,
    *,
    steps: int,
    lr: float = 1e-3,
    warmup: int = 0,
    weight_decay: float = 0.1,
    grad_clip: float | None = 1.0,
    eval_every: int = 0,
    eval_fn: EvalFn | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    progress: bool = True,
    time_limit: float | None = None,
    accumulate: int = 1,
    parallel: Parallel = "ddp",
    activation_checkpointing: bool = False,
    compile: bool = False,
    precision: str = "fp32",
    context_parallel: int = 1,
) -> TrainResult:
    """Train ``model`` for ``steps`` optimisation steps on ``batches(step)`` (step 1, 2, ...) and return the history.

    AdamW (betas 0.9/0.95) with :func:`param_groups`' weight decay and :func:`lr_at`'s schedule; gradients are
    clipped to total norm ``grad_clip`` (``None``: no clipping). Every ``eval_every`` steps and after the last one,
    ``eval_fn(model)`` runs in eval mode without gradients. With ``checkpoint_dir`` a checkpoint is written every
    ``checkpoint_every`` steps (0: only at the end) and after the last step; ``resume`` continues from the newest
    one there (raising :class:`~titans_compose.train.checkpoint.CheckpointError` if there is none); with the same
    arguments it reproduces the uninterrupted run exactly on the CPU (a different ``steps`` continues on the new
    schedule). With ``time_limit`` (seconds), training ends after the first step that finishes past it, which then
    counts as the last step (evaluated and checkpointed); the schedule still spans ``steps``. Raises
    :class:`TrainingError` before any update from a non-finite loss or gradient, or when a memory layer diverges
    (the model's :class:`~titans_compose.ops.memory.finite.MemoryDivergedError`, naming the layer and token).

    ``batches(step)`` is the step's whole (global) batch; a :class:`~titans_compose.train.data.RowSampler` is asked
    for this rank's rows only. In a torch.distributed process group of N ranks
    (torchrun), each rank trains on its 1/N of the rows with ``parallel`` "ddp" or "fsdp" (FSDP2, parameters
    sharded), only rank 0 writes checkpoints and shows progress, and every rank must call this. ``accumulate`` = K
    splits each rank's rows into K micro-batches whose gradients add up before the update. The loss is the mean
    over every target of the global batch either way, so N ranks x K micro-batches take the step one process takes
    on the whole batch (up to the order of floating-point sums). ``activation_checkpointing`` recomputes each
    layer's activations in the backward pass instead of keeping them; ``compile`` runs the step's forward and
    backward through ``torch.compile``.

    ``precision`` (``fp32``, ``bf16``, ``fp16``; :mod:`~titans_compose.train.precision`) runs the forward passes
    under autocast on the model's device; with ``fp16`` a step whose gradients overflow is skipped by the gradient
    scaler instead of stopping the run.

    ``context_parallel`` = C splits every sequence over C consecutive ranks (:mod:`~titans_compose.train.context`;
    ``model`` must be a :class:`~titans_compose.nn.model.TitansLM`, which it leaves split): the N ranks form N / C
    data-parallel groups, each taking its rows of the global batch, and each rank of a group its 1/C of their tokens.
    ``eval_fn`` is then given the split model and must feed each rank's piece (as
    :func:`~titans_compose.train.run.evaluate` does).
    """
    if steps < 1 or warmup < 0 or eval_every < 0 or checkpoint_every < 0 or lr <= 0 or accumulate < 1:
        raise ValueError(
            f"need steps >= 1, lr > 0, accumulate >= 1 and warmup, eval_every, checkpoint_every >= 0; got steps "
            f"{steps}, lr {lr}, accumulate {accumulate}, warmup {warmup}, eval_every {eval_every}, checkpoint_every "
            f"{checkpoint_every}"
        )
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs a checkpoint_dir")
    if context_parallel > 1:
        if compile:
            raise ValueError("context parallelism does not run under torch.compile: leave compile off")
        if not hasattr(model, "split_sequence"):
            raise ValueError(
                f"context parallelism splits a titans_compose model's sequence mixers by heads; a "
                f"{type(model).__name__} has none to split"
            )
        if problems := model.context_parallel_problems(context_parallel):
            raise ValueError(f"context parallelism over {context_parallel} ranks: {'; '.join(problems)}")
    world = World.current()
    data_world, context = split_world(world, context_parallel)
    if context is not None:
        model.split_sequence(context)
    runner, evaluated = prepare(
        model, world=world, parallel=parallel, activation_checkpointing=activation_checkpointing, compile=compile
    )
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    amp = MixedPrecision(precision, next(model.parameters()).device)
    result, start = TrainResult(), 0
    if resume:
        state = load_checkpoint(checkpoint_dir, model=model, optimizer=optimizer)  # type: ignore[arg-type]
        start, result = state["step"], TrainResult.from_json(state)
        amp.load_state_dict(state.get("grad_scaler", {}))
    device = next(model.parameters()).device

    def checkpoint(step: int) -> None:
        result.checkpoint = save_checkpoint(
            checkpoint_dir,  # type: ignore[arg-type]
            step=step,
            model=model,
            optimizer=optimizer,
            state={"steps": steps, **result.to_json(), "grad_scaler": amp.state_dict()},
            write=world.writes,
        )

    def evaluate(step: int) -> None:
        if eval_fn is None:
            return
        evaluated.eval()
        with torch.no_grad(), amp.autocast():
            result.evals.append((step, {k: float(v) for k, v in eval_fn(evaluated).items()}))
        evaluated.train()

    def step_loss(step: int, parts: list[Piece]) -> float:
        """Forward and backward of every micro-batch; the mean loss over the global batch's targets."""
        count = sum(target_count(part.batch) for part in parts)
        total = float(all_sum(torch.tensor(float(count), device=device), world))
        if not total:
            raise TrainingError(f"step {step}: {NO_TARGET}")
        losses = []
        for i, part in enumerate(parts):
            with gradient_sync(runner, i == len(parts) - 1):
                with amp.autocast():
                    logits = _diverged_at(step, piece_logits, runner, part)
                    loss, _ = next_token_loss_sum(logits, part.batch)
                # the ranks' gradients are averaged, so each rank's share is scaled up by the number of ranks
                amp.backward(loss / (total / world.size))
            losses.append(loss.detach())
        return float(all_sum(torch.stack(losses).sum(), world)) / total

    from tqdm.auto import tqdm

    model.train()
    bar = tqdm(total=steps, initial=start, disable=not progress or not world.writes, unit="step", dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for step in range(start + 1, steps + 1):
            began = time.perf_counter()
            mine = step_batches(batches, step, data_world, accumulate)
            rate = lr_at(step, lr=lr, warmup=warmup, steps=steps)
            for group in optimizer.param_groups:
                group["lr"] = rate
            optimizer.zero_grad(set_to_none=True)
            parts = [sequence_piece(part, context) for part in mine]
            value = step_loss(step, parts)
            if not math.isfinite(value):
                raise TrainingError(f"the training loss is {value} at step {step}: lower the learning rate")
            amp.unscale_(optimizer)  # the clip sees the true gradients
            # the norm is needed anyway to clip; without clipping max_norm=inf leaves the gradients as they are
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf if grad_clip is None else grad_clip)
            if not math.isfinite(float(full_tensor(norm))) and amp.scaler is None:  # fp16: the scaler skips the step
                raise TrainingError(
                    f"the gradient norm is {float(full_tensor(norm))} at step {step} (the loss is {value}): lower "
                    "the learning rate"
                )
            amp.step(optimizer)
            if device.type == "cuda":  # kernels run asynchronously: wait for them, so the step's time is its own
                torch.cuda.synchronize(device)
            step_tokens = sum(part.tokens.numel() for part in mine) * data_world.size  # the global batch's
            speed = step_tokens / max(time.perf_counter() - began, 1e-9)
            result.history.append(StepRecord(step, value, rate, speed))
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{speed:,.0f}")
            late = time_limit is not None and time.perf_counter() - started >= time_limit
            if world.size > 1 and time_limit is not None:  # rank 0's clock decides, so every rank stops together
                late = bool(all_sum(torch.tensor(float(late and world.writes), device=device), world))
            last = step == steps or late
            if last or (eval_every and step % eval_every == 0):
                _diverged_at(step, evaluate, step)
            if checkpoint_dir is not None and (last or (checkpoint_every and step % checkpoint_every == 0)):
                checkpoint(step)
            if last:
                break
    finally:
        bar.close()
    return result
