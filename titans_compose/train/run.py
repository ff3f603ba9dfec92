"""A training run from its options: the task's batches, the evaluation, the loop, and the metrics files.

The command line (``titans-compose train``) and sweeps share this; neither click nor any command-line module is
needed to call it. A setting the task cannot use raises :class:`OptionError` naming the option.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from titans_compose.io import atomic_write
from titans_compose.nn.context import ContextGroup
from titans_compose.train.context import sequence_piece
from titans_compose.train.data import Batch, DataError, WindowSampler, derive_seed, load_corpus
from titans_compose.train.loop import (
    NO_TARGET,
    BatchSource,
    TrainingError,
    TrainResult,
    next_token_loss_sum,
    piece_logits,
    train,
)
from titans_compose.train.tasks import (
    TaskBatch,
    exact_match_of,
    max_token,
    mqar_batch,
    mqar_len,
    passkey_batch,
    passkey_min_len,
)
from titans_compose.train.tokens import open_tokens, split_samplers


class OptionError(ValueError):
    """A training option the task cannot use; ``option`` names it as the command line spells it (``--seq-len``)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option, self.message = option, message


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def make_task(
    options: dict[str, Any], warn: Callable[[str], None] = _stderr
) -> tuple[BatchSource, list[Batch], str, int]:
    """The training batch source, the validation batches, a one-line description for the chosen task and the
    largest token id its batches can hold. Files of a ``--data`` folder that were skipped are passed to ``warn``.
    Raises :class:`OptionError` for a setting the task cannot use."""
    task, batch, seq_len, seed = options["task"], options["batch"], options["seq_len"], options["seed"]
    if options.get("tokens") is not None:
        return token_task(options)
    if options.get("separator") is not None:
        raise OptionError("--separator", "a separator applies to a token file: give --tokens")
    corpus = None
    if task == "lm" or options["data"] is not None:
        max_bytes = int(options["max_mb"] * 1e6)
        if max_bytes < 2:
            raise OptionError("--max-mb", f"{options['max_mb']} MB is less than the 2 bytes of text needed")
        try:
            corpus = load_corpus(options["data"], max_bytes=max_bytes)
        except DataError as exc:
            raise OptionError("--data", str(exc)) from None
        for skipped in corpus.skipped:
            warn(f"warning: --data: skipped {skipped}")
    n_eval = options["eval_batches"]

    if task == "lm":
        try:
            train_src = WindowSampler(corpus.train, batch, seq_len, seed, "train")
            val_src = WindowSampler(corpus.val, batch, seq_len, seed, "val")
        except DataError as exc:
            raise OptionError("--seq-len", str(exc)) from None
        top = max(int(corpus.train.max()), int(corpus.val.max()))
        return train_src, [val_src(i) for i in range(n_eval)], f"lm on {corpus.describe()}", top

    filler = "repeat" if corpus is None else corpus.train
    loss_on = options["loss_on"]  # validation scores the answers either way
    if task == "passkey":
        if seq_len < passkey_min_len(options["digits"]):
            raise OptionError(
                "--seq-len",
                f"{seq_len} is too short for a {options['digits']}-digit pass key (at least "
                f"{passkey_min_len(options['digits'])})",
            )

        def make(step: int, stream: str) -> Batch:
            gen_seed = derive_seed(seed, stream, step)
            return passkey_batch(
                batch,
                seq_len,
                depth=options["depth"],
                digits=options["digits"],
                filler=filler,
                loss_on=loss_on if stream == "train" else "answer",
                seed=gen_seed,
            )

        depth = "random" if options["depth"] is None else options["depth"]
        describe = f"passkey: {options['digits']} digits in {seq_len} bytes, depth {depth}"
    else:
        pairs, queries = options["pairs"], options["queries"]
        if queries > pairs:
            raise OptionError("--queries", f"{queries} queries of {pairs} pairs: at most --pairs")
        if seq_len < mqar_len(pairs, queries):
            raise OptionError(
                "--seq-len",
                f"{seq_len} is too short for {pairs} pairs and {queries} queries (at least {mqar_len(pairs, queries)})",
            )

        def make(step: int, stream: str) -> Batch:
            gen_seed = derive_seed(seed, stream, step)
            return mqar_batch(
                batch,
                pairs=pairs,
                queries=queries,
                seq_len=seq_len,
                filler=filler,
                loss_on=loss_on if stream == "train" else "answer",
                seed=gen_seed,
            )

        describe = f"mqar: {pairs} pairs, {queries} queries in {seq_len} bytes"
    if isinstance(filler, torch.Tensor) and filler.numel() < seq_len:
        raise OptionError("--data", f"the text has fewer than {seq_len} bytes")
    top = max_token(task, filler)
    return (lambda step: make(step, "train")), [make(i, "val") for i in range(n_eval)], describe, top


def token_task(options: dict[str, Any]) -> tuple[BatchSource, list[Batch], str, int]:
    """:func:`make_task` for ``--tokens``: samplers of the file's training part and validation tail, and the largest
    id the model must take (the sidecar's vocabulary, or the file's largest id if that is larger)."""
    if options["task"] != "lm" or options["data"] is not None:
        raise OptionError("--tokens", "a token file is language-model data: use it with --task lm, without --data")
    try:
        tokens = open_tokens(options["tokens"])
        separator = tokens.separator if options.get("separator") is None else options["separator"]
        if separator is not None and separator >= tokens.vocab_size:
            raise DataError(f"the separator id {separator} is not below the file's vocabulary of {tokens.vocab_size}")
        train_src, val_src = split_samplers(
            tokens, options["batch"], options["seq_len"], seed=options["seed"], val_percent=5.0, separator=separator
        )
        top = max(tokens.vocab_size - 1, tokens.max_id())
    except DataError as exc:
        raise OptionError("--tokens", str(exc)) from None
    describe = (
        f"lm on {tokens.path.name}: {len(tokens):,} tokens ({train_src.end:,} train, {val_src.end - val_src.start:,} "
        f"validation), vocabulary {tokens.vocab_size:,}, separator {separator}"
    )
    return train_src, [val_src(i) for i in range(options["eval_batches"])], describe, top


def evaluate(
    model: torch.nn.Module, batches: list[Batch], unit: str = "byte", context: ContextGroup | None = None
) -> dict[str, float]:
    """Mean validation loss over ``batches`` (with bits per ``unit``: byte or token) or, for task batches, the loss on
    the answers and the exact-match accuracy. With ``context`` (the group ``model`` is split over), each rank
    scores its piece of every batch: the loss sums and target counts are summed over the group, and the predicted
    tokens (not the logits) gathered from it to score the answers."""
    loss = accuracy = 0.0
    for b in batches:
        piece = sequence_piece(b, context)
        logits = piece_logits(model, piece)
        total, count = next_token_loss_sum(logits, piece.batch)
        if context is not None:
            total, count = context.sum(torch.stack([total.double(), total.new_tensor(count, dtype=torch.float64)]))
        if not count:
            raise TrainingError(NO_TARGET)
        loss += float(total / count) / len(batches)
        if isinstance(b, TaskBatch):
            predicted = logits.argmax(-1)
            accuracy += exact_match_of(predicted if context is None else context.gather(predicted), b) / len(batches)
    if isinstance(batches[0], TaskBatch):
        return {"val_answer_loss": loss, "val_accuracy": accuracy}
    return {"val_loss": loss, f"val_bits_per_{unit}": loss / math.log(2)}


def eval_unit(options: dict[str, Any]) -> str:
    """What validation bits are counted per: ``byte`` for text, ``token`` for a token file."""
    return "byte" if options.get("tokens") is None else "token"


def loop_options(options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`~titans_compose.train.loop.train` that a run's ``options`` set, the command
    line's or a sweep file's ``train`` section's (which name no ranks: one process): the schedule, the
    regularisation and how each step is computed."""
    return {
        "steps": options["steps"],
        "lr": options["lr"],
        "warmup": options["warmup"],
        "weight_decay": options["weight_decay"],
        "grad_clip": options["grad_clip"] or None,
        "accumulate": options.get("accumulate", 1),
        "parallel": options.get("parallel", "ddp"),
        "activation_checkpointing": options.get("activation_checkpointing", False),
        "compile": options.get("compile", False),
        "precision": options.get("precision", "fp32"),
        "context_parallel": options.get("context_parallel", 1),
    }


def run_training(
    module: torch.nn.Module,
    source: BatchSource,
    val_batches: list[Batch],
    options: dict[str, Any],
    out: Path,
    from_checkpoint: bool,
) -> TrainResult:
    """Train ``module`` (on its device) with the run's ``options``, evaluating on ``val_batches`` and checkpointing
    every ``eval_every`` steps into ``out/checkpoints`` (continuing from the newest checkpoint if
    ``from_checkpoint``). Raises the loop's :class:`~titans_compose.train.loop.TrainingError` and
    :class:`~titans_compose.train.checkpoint.CheckpointError`."""
    torch.manual_seed(options["seed"])
    unit = eval_unit(options)
    return train(
        module,
        source,
        **loop_options(options),
        eval_every=options["eval_every"],
        eval_fn=lambda model: evaluate(model, val_batches, unit, getattr(module, "context", None)),
        checkpoint_dir=out / "checkpoints",
        checkpoint_every=options["eval_every"],
        resume=from_checkpoint,
        progress=not options["no_progress"],
    )


def write_metrics(out: Path, config: dict[str, Any], describe: str, result: TrainResult) -> dict[str, float]:
    """``metrics.json`` (the config, the task, the final evaluation and the history) and ``metrics.csv`` (one row
    per step, with the evaluations at the steps that had one) in ``out``; returns the final evaluation."""
    final = result.evals[-1][1] if result.evals else {}
    atomic_write(
        out / "metrics.json",
        json.dumps({"config": config, "task": describe, "final": final, **result.to_json()}, indent=1) + "\n",
    )
    eval_at = dict(result.evals)
    names = sorted({k for _, m in result.evals for k in m})
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["step", "loss", "lr", "tokens_per_s", *names])
    for r in result.history:
        writer.writerow([r.step, r.loss, r.lr, r.tokens_per_s, *(eval_at.get(r.step, {}).get(n, "") for n in names)])
    atomic_write(out / "metrics.csv", table.getvalue())
    return final
