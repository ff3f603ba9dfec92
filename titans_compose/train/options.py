"""The options of a training run, declared once for ``titans-compose train`` and a sweep file's ``train`` section.

Only click is imported here (no torch), so reading a sweep file or ``train --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from titans_compose.click_types import SEED, FiniteFloat

#: run options that must not change when a run is resumed (the batches and the model would differ). ``--batch`` and
#: ``--accumulate`` may change, and so may the number of ranks, as long as batch x accumulate x ranks (the global
#: batch) stays the run's; ``--parallel``, ``--context-parallel``, ``--activation-checkpointing``, ``--compile`` and
#: ``--precision`` change how a step is computed, not what it computes, and may change too.
FIXED_ON_RESUME = (
    "spec",
    "overrides",
    "task",
    "data",
    "tokens",
    "separator",
    "max_mb",
    "seq_len",
    "lr",
    "warmup",
    "weight_decay",
    "grad_clip",
    "seed",
    "depth",
    "digits",
    "pairs",
    "queries",
    "loss_on",
)

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def default_warmup(steps: int) -> int:
    """The warm-up when none is given: a tenth of the steps, at most 100."""
    return min(100, steps // 10)


def _apply(fn: Callable[..., Any], options: list[Decorator]) -> Callable[..., Any]:
    for option in reversed(options):  # click lists options in the order their decorators are written
        fn = option(fn)
    return fn


def training_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The task, data, budget and optimiser options, in ``--help`` order."""
    return _apply(
        fn,
        [
            click.option(
                "--data",
                type=click.Path(exists=True, path_type=Path),
                help="A text file or directory (default: the Python standard library's .py files). For the tasks it "
                "is the haystack filler (default: a repeated sentence).",
            ),
            click.option(
                "--tokens",
                type=click.Path(exists=True, dir_okay=False, path_type=Path),
                help="lm on a token file (OUT.bin with its OUT.bin.json sidecar, from `titans-compose data "
                "tokenize`); the last 5%% of it is the validation part.",
            ),
            click.option(
                "--separator",
                type=click.IntRange(min=0),
                help="--tokens: the id that starts each packed document, resetting the model's state [default: the "
                "sidecar's].",
            ),
            click.option("--task", type=click.Choice(["lm", "passkey", "mqar"]), default="lm", show_default=True),
            click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True),
            click.option(
                "--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Sequences per step."
            ),
            click.option(
                "--seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per sequence."
            ),
            click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=1e-3, show_default=True),
            click.option(
                "--warmup", type=click.IntRange(min=0), help="Warm-up steps [default: steps/10, at most 100]."
            ),
            click.option("--weight-decay", type=FiniteFloat(min=0), default=0.1, show_default=True),
            click.option(
                "--grad-clip", type=FiniteFloat(min=0), default=1.0, show_default=True, help="0: no clipping."
            ),
            click.option(
                "--eval-every",
                type=click.IntRange(min=0),
                help="Evaluate and checkpoint every N steps [default: steps/5].",
            ),
            click.option("--eval-batches", type=click.IntRange(min=1), default=4, show_default=True),
            click.option("--depth", type=FiniteFloat(0, 1), help="passkey: needle depth in [0, 1] [default: random]."),
            click.option(
                "--digits", type=click.IntRange(1, 18), default=5, show_default=True, help="passkey: key digits."
            ),
            click.option(
                "--pairs", type=click.IntRange(1, 676), default=16, show_default=True, help="mqar: key-value pairs."
            ),
            click.option("--queries", type=click.IntRange(min=1), default=4, show_default=True, help="mqar: queries."),
            click.option(
                "--loss-on",
                type=click.Choice(["answer", "all"]),
                default="answer",
                show_default=True,
                help="passkey/mqar: train on the answer tokens only, or on every token.",
            ),
            click.option(
                "--max-mb",
                type=FiniteFloat(min=0, min_open=True),
                default=8.0,
                show_default=True,
                help="Text to read, MB.",
            ),
        ],
    )


def scaling_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """How each step is computed: over ranks, in micro-batches, with recomputed activations, compiled."""
    return _apply(
        fn,
        [
            click.option(
                "--accumulate",
                type=click.IntRange(min=1),
                default=1,
                show_default=True,
                help="Micro-batches of --batch sequences per rank whose gradients add up to one step (global batch: "
                "batch x accumulate x ranks).",
            ),
            click.option(
                "--parallel",
                type=click.Choice(["ddp", "fsdp"]),
                default="ddp",
                show_default=True,
                help="Under torchrun with several processes: replicate the model (DDP) or shard its parameters, "
                "gradients and optimizer state (FSDP2).",
            ),
            click.option(
                "--activation-checkpointing",
                is_flag=True,
                help="Keep only each layer's input for the backward pass and recompute the rest (less memory, about "
                "one more forward).",
            ),
            click.option(
                "--context-parallel",
                type=click.IntRange(min=1),
                default=1,
                show_default=True,
                help="Under torchrun: split every sequence over N consecutive processes, each running the memory and "
                "attention of 1/N of the heads over the whole sequence (needs heads and --seq-len divisible by N; "
                "not with --compile or packed documents). The processes form processes/N data-parallel groups.",
            ),
            click.option("--compile", is_flag=True, help="Run the training step's model through torch.compile."),
            click.option(
                "--precision",
                type=click.Choice(["fp32", "bf16", "fp16"]),
                default="fp32",
                show_default=True,
                help="Activation dtype under torch.autocast on the run's device (fp16 with a gradient scaler); "
                "parameters, optimizer and the memory state stay float32.",
            ),
        ],
    )


seed_option: Decorator = click.option(
    "--seed", type=SEED, default=0, show_default=True, help="Seed for the initial weights and the batches."
)


def training_command() -> click.Command:
    """A command holding just the training and step options (and ``--seed``): their names, types, ranges and
    defaults, for checking a sweep file's ``train`` section with the command line's own rules."""
    options = seed_option(training_options(scaling_options(lambda **_: None)))
    return click.Command("train", params=click.command()(options).params)
