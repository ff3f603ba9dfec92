"""``titans-compose train``: build a spec's model and train it on offline bytes or a synthetic long-context task."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from titans_compose.cli.main import (
    SEED,
    FiniteFloat,
    device_option,
    echo_diagnostics,
    guarded,
    model_registry,
    out_option,
    settings,
    spec_options,
)

if TYPE_CHECKING:  # torch is imported only when the command runs
    import torch

    from titans_compose.train.data import Batch
    from titans_compose.train.loop import BatchSource

#: run options that must not change when a run is resumed (the batches and the model would differ)
FIXED_ON_RESUME = (
    "spec",
    "overrides",
    "task",
    "data",
    "tokens",
    "separator",
    "max_mb",
    "batch",
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


def default_warmup(steps: int) -> int:
    """The warm-up when none is given: a tenth of the steps, at most 100."""
    return min(100, steps // 10)


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option(
    "--data",
    type=click.Path(exists=True, path_type=Path),
    help="A text file or directory (default: the Python standard library's .py files). For the tasks it is the "
    "haystack filler (default: a repeated sentence).",
)
@click.option(
    "--tokens",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="lm on a token file (OUT.bin with its OUT.bin.json sidecar, from `titans-compose data tokenize`); the "
    "last 5%% of it is the validation part.",
)
@click.option(
    "--separator",
    type=click.IntRange(min=0),
    help="--tokens: the id that starts each packed document, resetting the model's state [default: the sidecar's].",
)
@click.option("--task", type=click.Choice(["lm", "passkey", "mqar"]), default="lm", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Sequences per step.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per sequence.")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), help="Warm-up steps [default: steps/10, at most 100].")
@click.option("--weight-decay", type=FiniteFloat(min=0), default=0.1, show_default=True)
@click.option("--grad-clip", type=FiniteFloat(min=0), default=1.0, show_default=True, help="0: no clipping.")
@click.option(
    "--eval-every", type=click.IntRange(min=0), help="Evaluate and checkpoint every N steps [default: steps/5]."
)
@click.option("--eval-batches", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--depth", type=FiniteFloat(0, 1), help="passkey: needle depth in [0, 1] [default: random].")
@click.option("--digits", type=click.IntRange(1, 18), default=5, show_default=True, help="passkey: key digits.")
@click.option("--pairs", type=click.IntRange(1, 676), default=16, show_default=True, help="mqar: key-value pairs.")
@click.option("--queries", type=click.IntRange(min=1), default=4, show_default=True, help="mqar: queries.")
@click.option(
    "--loss-on",
    type=click.Choice(["answer", "all"]),
    default="answer",
    show_default=True,
    help="passkey/mqar: train on the answer tokens only, or on every token.",
)
@click.option(
    "--max-mb", type=FiniteFloat(min=0, min_open=True), default=8.0, show_default=True, help="Text to read, MB."
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Activation dtype under torch.autocast on the run's device (fp16 with a gradient scaler); parameters, "
    "optimizer and the memory state stay float32.",
)
@out_option("out", "Run directory [runs/<spec>].", type=click.Path(file_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Continue the run in --out from its newest checkpoint.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for the initial weights and the batches.")
@device_option
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@spec_options
@click.pass_context
def train(ctx: click.Context, spec: str, sub_plugins: tuple[str, ...], sub_debug: bool, **options: Any) -> None:
    """Train SPEC's model on byte-level text (--task lm) or a synthetic task, with checkpoints and metrics in --out.

    lm reports validation loss and bits per byte; passkey and mqar report exact-match accuracy on held-out batches.
    One run at a time holds --out; a run killed at any moment continues with --resume.
    """
    plugins, debug = settings(ctx, sub_plugins, sub_debug)
    # paths as absolute strings, so that resuming from another directory compares equal
    options["spec"] = str(Path(spec).resolve())
    options["data"] = None if options["data"] is None else str(options["data"].resolve())
    options["tokens"] = None if options["tokens"] is None else str(options["tokens"].resolve())
    options["overrides"] = list(options["overrides"])

    def body() -> int:
        from titans_compose.builder import BuildError, build, check_output_dir, spec_name
        from titans_compose.io import atomic_write, default_dir
        from titans_compose.lock import locked
        from titans_compose.spec import load_spec
        from titans_compose.train.checkpoint import remove_interrupted
        from titans_compose.train.tasks import check_vocabulary
        from titans_compose.train.tokens import check_token_vocabulary

        registry = model_registry(plugins, debug)
        if registry is None:
            return 1
        given = list(options["overrides"])
        loaded = load_spec(spec, given, registry=registry)
        out = options["out"] or default_dir("runs", spec_name(loaded))
        if options["resume"] and not out.is_dir():  # before the lock, which would create a mistyped directory
            raise click.BadParameter(f"no run in {out} to resume (no such directory)", param_hint="'--resume'")
        with locked(out, "train run", click.ClickException):
            remove_interrupted(out / "checkpoints")
            from_checkpoint = resolve_run(ctx, out, options)
            if options["overrides"] != given:  # resuming a run made with other --set values: rebuild its spec
                loaded = load_spec(spec, options["overrides"], registry=registry)
            echo_diagnostics(loaded.warnings)
            if options["warmup"] is None:
                options["warmup"] = default_warmup(options["steps"])
            if options["eval_every"] is None:
                options["eval_every"] = max(1, options["steps"] // 5)
            config = {k: v for k, v in options.items() if k not in ("out", "resume", "device", "no_progress")}
            source, val_batches, describe, top = make_task(options)
            try:
                if options["tokens"] is None:
                    check_vocabulary(loaded.spec.model.vocab_size, top, describe)
                else:
                    check_token_vocabulary(loaded.spec.model.vocab_size, top, options["tokens"])
            except ValueError as exc:
                raise click.ClickException(f"{loaded.source}: {exc}") from None
            remove_interrupted_build(out / "build")
            try:
                check_output_dir(out / "build", Path(loaded.source))
                # written before anything else (atomically, and again on every resume, for its --steps), so a run
                # killed at any later moment resumes
                atomic_write(out / "config.json", json.dumps(config, indent=2) + "\n")
                built = build(loaded, plugins=plugins, output_dir=out / "build", seed=options["seed"])
            except BuildError as exc:
                raise click.ClickException(str(exc)) from None
            return run(built.module, source, val_batches, describe, options, config, out, from_checkpoint)

    guarded(ctx, debug, body)


def resolve_run(ctx: click.Context, out: Path, options: dict[str, Any]) -> bool:
    """Check ``out`` against ``--resume`` and, when resuming, take the run's settings from its ``config.json``;
    return whether training continues from a checkpoint.

    A new run must not start over an existing one, and a resumed run must exist: a ``config.json`` (a run killed
    before its first checkpoint starts again from step 0 with its settings) or a checkpoint. A resumed run keeps the
    settings that decide its batches and model (:data:`FIXED_ON_RESUME`; one given with another value is an error);
    the others (``--steps``, ``--eval-every``, ``--eval-batches``) may change. Settings not given are the run's.
    """
    from titans_compose.train.checkpoint import LATEST

    has_checkpoint = (out / "checkpoints" / LATEST).is_file()
    if options["resume"] and not has_checkpoint and not (out / "config.json").is_file():
        raise click.BadParameter(
            f"no run in {out} to resume (no config.json, no checkpoint in {out / 'checkpoints'})",
            param_hint="'--resume'",
        )
    if not options["resume"]:
        if has_checkpoint:
            raise click.BadParameter(
                f"{out} already holds a run: pass --resume to continue it, or choose another --out",
                param_hint="'--out'",
            )
        return False
    try:
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise click.ClickException(f"cannot resume: {out / 'config.json'} is missing or unreadable ({exc})") from None
    changed = []
    for key, value in saved.items():
        if key not in options:
            continue
        if ctx.get_parameter_source(key) in (None, click.core.ParameterSource.DEFAULT):
            options[key] = value
        elif key in FIXED_ON_RESUME and value != options[key]:
            changed.append(f"--{key.replace('_', '-')} {options[key]!r} (the run has {value!r})")
    if changed:
        raise click.UsageError(f"--resume continues a run with its own settings; these differ: {', '.join(changed)}")
    return has_checkpoint


def remove_interrupted_build(path: Path) -> None:
    """Delete ``path`` if it is a build that a killed run left half-written: no manifest of a build, and nothing but
    the files a build writes and their atomic-write temporaries. Anything else there is left for the builder's
    own check (which refuses a directory holding other files)."""
    import shutil

    from titans_compose.builder import BUILD_FILES, FORMAT
    from titans_compose.io import temporaries
    from titans_compose.manifest import MANIFEST, read_manifest

    if not path.is_dir() or read_manifest(path, FORMAT) is not None:
        return
    ours = {*BUILD_FILES, MANIFEST, *(p.name for p in temporaries(path, (*BUILD_FILES, MANIFEST)))}
    if all(entry.is_file() and entry.name in ours for entry in path.iterdir()):
        shutil.rmtree(path)


def make_task(options: dict[str, Any]) -> tuple[BatchSource, list[Batch], str, int]:
    """The training batch source, the validation batches, a one-line description for the chosen task and the
    largest token id its batches can hold. Files of a ``--data`` folder that were skipped are named on stderr."""
    import torch

    from titans_compose.train.data import DataError, WindowSampler, derive_seed, load_corpus
    from titans_compose.train.tasks import max_token, mqar_batch, mqar_len, passkey_batch, passkey_min_len

    task, batch, seq_len, seed = options["task"], options["batch"], options["seq_len"], options["seed"]
    if options["tokens"] is not None:
        return token_task(options)
    if options["separator"] is not None:
        raise click.BadParameter("a separator applies to a token file: give --tokens", param_hint="'--separator'")
    corpus = None
    if task == "lm" or options["data"] is not None:
        max_bytes = int(options["max_mb"] * 1e6)
        if max_bytes < 2:
            raise click.BadParameter(
                f"{options['max_mb']} MB is less than the 2 bytes of text needed", param_hint="'--max-mb'"
            )
        try:
            corpus = load_corpus(options["data"], max_bytes=max_bytes)
        except DataError as exc:
            raise click.BadParameter(str(exc), param_hint="'--data'") from None
        for skipped in corpus.skipped:
            click.echo(f"warning: --data: skipped {skipped}", err=True)
    n_eval = options["eval_batches"]

    if task == "lm":
        try:
            train_src = WindowSampler(corpus.train, batch, seq_len, seed, "train")
            val_src = WindowSampler(corpus.val, batch, seq_len, seed, "val")
        except DataError as exc:
            raise click.BadParameter(str(exc), param_hint="'--seq-len'") from None
        top = max(int(corpus.train.max()), int(corpus.val.max()))
        return train_src, [val_src(i) for i in range(n_eval)], f"lm on {corpus.describe()}", top

    filler = "repeat" if corpus is None else corpus.train
    loss_on = options["loss_on"]  # validation scores the answers either way
    if task == "passkey":
        if seq_len < passkey_min_len(options["digits"]):
            raise click.BadParameter(
                f"{seq_len} is too short for a {options['digits']}-digit pass key (at least "
                f"{passkey_min_len(options['digits'])})",
                param_hint="'--seq-len'",
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
            raise click.BadParameter(f"{queries} queries of {pairs} pairs: at most --pairs", param_hint="'--queries'")
        if seq_len < mqar_len(pairs, queries):
            raise click.BadParameter(
                f"{seq_len} is too short for {pairs} pairs and {queries} queries (at least {mqar_len(pairs, queries)})",
                param_hint="'--seq-len'",
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
        raise click.BadParameter(f"the text has fewer than {seq_len} bytes", param_hint="'--data'")
    top = max_token(task, filler)
    return (lambda step: make(step, "train")), [make(i, "val") for i in range(n_eval)], describe, top


def token_task(options: dict[str, Any]) -> tuple[BatchSource, list[Batch], str, int]:
    """:func:`make_task` for ``--tokens``: samplers of the file's training part and validation tail, and the largest
    id the model must take (the sidecar's vocabulary, or the file's largest id if that is larger)."""
    from titans_compose.train.data import DataError
    from titans_compose.train.tokens import open_tokens, split_samplers

    if options["task"] != "lm" or options["data"] is not None:
        raise click.BadParameter("a token file is language-model data: use it with --task lm, without --data",
                                 param_hint="'--tokens'")  # fmt: skip
    try:
        tokens = open_tokens(options["tokens"])
        separator = tokens.separator if options["separator"] is None else options["separator"]
        if separator is not None and separator >= tokens.vocab_size:
            raise DataError(f"the separator id {separator} is not below the file's vocabulary of {tokens.vocab_size}")
        train_src, val_src = split_samplers(
            tokens, options["batch"], options["seq_len"], seed=options["seed"], val_percent=5.0, separator=separator
        )
        top = max(tokens.vocab_size - 1, tokens.max_id())
    except DataError as exc:
        raise click.BadParameter(str(exc), param_hint="'--tokens'") from None
    describe = (
        f"lm on {tokens.path.name}: {len(tokens):,} tokens ({train_src.end:,} train, {val_src.end - val_src.start:,} "
        f"validation), vocabulary {tokens.vocab_size:,}, separator {separator}"
    )
    return train_src, [val_src(i) for i in range(options["eval_batches"])], describe, top


def evaluate(model: torch.nn.Module, batches: list[Batch], unit: str = "byte") -> dict[str, float]:
    """Mean validation loss over ``batches`` (with bits per ``unit``: byte or token) or, for task batches, the loss on
    the answers and the exact-match accuracy."""
    from titans_compose.train.loop import batch_logits, next_token_loss
    from titans_compose.train.tasks import TaskBatch, exact_match

    loss = accuracy = 0.0
    for b in batches:
        logits = batch_logits(model, b)
        loss += float(next_token_loss(logits, b)) / len(batches)
        if isinstance(b, TaskBatch):
            accuracy += exact_match(logits, b) / len(batches)
    if isinstance(batches[0], TaskBatch):
        return {"val_answer_loss": loss, "val_accuracy": accuracy}
    return {"val_loss": loss, f"val_bits_per_{unit}": loss / math.log(2)}


def run(
    module: torch.nn.Module,
    source: BatchSource,
    val_batches: list[Batch],
    describe: str,
    options: dict[str, Any],
    config: dict[str, Any],
    out: Path,
    from_checkpoint: bool,
) -> int:
    """Train (continuing from the newest checkpoint in ``out`` if ``from_checkpoint``), write ``metrics.json`` and
    ``metrics.csv`` to ``out`` and print a summary."""
    import csv
    import io

    import torch

    from titans_compose.io import atomic_write
    from titans_compose.train.checkpoint import CheckpointError
    from titans_compose.train.loop import TrainingError, train

    device = options["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        module = module.to(device)
    except (RuntimeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="'--device'") from None
    torch.manual_seed(options["seed"])
    click.echo(f"training on {device}: {describe}", err=True)
    try:
        result = train(
            module,
            source,
            steps=options["steps"],
            lr=options["lr"],
            warmup=options["warmup"],
            weight_decay=options["weight_decay"],
            grad_clip=options["grad_clip"] or None,
            eval_every=options["eval_every"],
            eval_fn=lambda model: evaluate(model, val_batches, "byte" if options.get("tokens") is None else "token"),
            checkpoint_dir=out / "checkpoints",
            checkpoint_every=options["eval_every"],
            resume=from_checkpoint,
            progress=not options["no_progress"],
            precision=options["precision"],
        )
    except (CheckpointError, TrainingError) as exc:
        raise click.ClickException(str(exc)) from None
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
    loss, speed = result.recent(10)
    click.echo(f"trained {options['steps']} steps: {describe}")
    click.echo(f"  train loss {loss:.4f} (mean of the last {min(10, len(result.history))} steps)")
    click.echo("  " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
    click.echo(f"  {speed:,.0f} tokens/s on {device}")
    click.echo(f"wrote {out}/ (config.json, metrics.json, metrics.csv, build/, checkpoints/)")
    return 0
