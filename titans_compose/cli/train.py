"""``titans-compose train``: build a spec's model and train it on offline bytes or a synthetic long-context task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from titans_compose.cli.main import (
    device_option,
    echo_diagnostics,
    guarded,
    model_registry,
    out_option,
    settings,
    spec_options,
)
from titans_compose.train.options import (
    FIXED_ON_RESUME,
    default_warmup,
    scaling_options,
    seed_option,
    training_options,
)

if TYPE_CHECKING:  # torch is imported only when the command runs
    import torch

    from titans_compose.train.data import Batch
    from titans_compose.train.distributed import World
    from titans_compose.train.loop import BatchSource


def __getattr__(name: str) -> Any:
    """``evaluate`` lived here; it is in :mod:`titans_compose.train.run` now (imported on use: it needs torch)."""
    if name == "evaluate":
        from titans_compose.train.run import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@training_options
@out_option("out", "Run directory [runs/<spec>].", type=click.Path(file_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Continue the run in --out from its newest checkpoint.")
@seed_option
@scaling_options
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
        from contextlib import nullcontext

        from titans_compose.builder import BuildError, build, check_output_dir, spec_name
        from titans_compose.io import atomic_write, default_dir
        from titans_compose.lock import locked
        from titans_compose.spec import load_spec
        from titans_compose.train.checkpoint import remove_interrupted
        from titans_compose.train.distributed import World, barrier, join_launched_group, shutdown
        from titans_compose.train.tasks import check_vocabulary
        from titans_compose.train.tokens import check_token_vocabulary

        registry = model_registry(plugins, debug)
        if registry is None:
            return 1
        options["device"] = join_launched_group(options["device"])
        world = World.current()
        given = list(options["overrides"])
        loaded = load_spec(spec, given, registry=registry)
        out = options["out"] or default_dir("runs", spec_name(loaded))
        if options["resume"] and not out.is_dir():  # before the lock, which would create a mistyped directory
            raise click.BadParameter(f"no run in {out} to resume (no such directory)", param_hint="'--resume'")
        # rank 0 holds the run and writes its files; the other ranks wait until it has, then read what they need
        with locked(out, "train run", click.ClickException) if world.writes else nullcontext():
            if world.writes:
                remove_interrupted(out / "checkpoints")
            else:
                barrier()
            from_checkpoint = resolve_run(ctx, out, options, world.size)
            check_context_parallel(options, world.size)
            if options["overrides"] != given:  # resuming a run made with other --set values: rebuild its spec
                loaded = load_spec(spec, options["overrides"], registry=registry)
            if world.writes:
                echo_diagnostics(loaded.warnings)
            if options["warmup"] is None:
                options["warmup"] = default_warmup(options["steps"])
            if options["eval_every"] is None:
                options["eval_every"] = max(1, options["steps"] // 5)
            options["world_size"] = world.size
            data_ranks = world.size // options["context_parallel"]  # each context group trains on the same rows
            options["global_batch"] = options["batch"] * options["accumulate"] * data_ranks
            config = {k: v for k, v in options.items() if k not in ("out", "resume", "device", "no_progress")}
            source, val_batches, describe, top = make_task({**options, "batch": options["global_batch"]})
            if options["context_parallel"] > 1 and any(b.cu_seqlens is not None for b in val_batches):
                raise click.BadParameter(
                    "the token file's documents are packed (it has a separator): each document restarts the memory "
                    "inside the sequence, which context parallelism does not split; use --context-parallel 1",
                    param_hint="'--context-parallel'",
                )
            try:
                if options["tokens"] is None:
                    check_vocabulary(loaded.spec.model.vocab_size, top, describe)
                else:
                    check_token_vocabulary(loaded.spec.model.vocab_size, top, options["tokens"])
            except ValueError as exc:
                raise click.ClickException(f"{loaded.source}: {exc}") from None
            try:
                if not world.writes:
                    built = build(loaded, plugins=plugins, seed=options["seed"])
                else:
                    remove_interrupted_build(out / "build")
                    check_output_dir(out / "build", Path(loaded.source))
                    # written before anything else (atomically, and again on every resume, for its --steps), so a
                    # run killed at any later moment resumes
                    atomic_write(out / "config.json", json.dumps(config, indent=2) + "\n")
                    built = build(loaded, plugins=plugins, output_dir=out / "build", seed=options["seed"])
                    if world.size > 1:
                        barrier()
            except BuildError as exc:
                raise click.ClickException(str(exc)) from None
            if options["context_parallel"] > 1 and (
                problems := built.module.context_parallel_problems(options["context_parallel"])
            ):
                raise click.BadParameter("; ".join(problems), param_hint="'--context-parallel'")
            status = run(built.module, source, val_batches, describe, options, config, out, from_checkpoint, world)
        shutdown()
        return status

    guarded(ctx, debug, body)


def check_context_parallel(options: dict[str, Any], processes: int) -> None:
    """Refuse a ``--context-parallel`` that the other options or the number of ``processes`` cannot take, naming
    the option at fault. (Packed documents and the model's heads are checked once the task and the model exist.)"""
    from titans_compose.train.context import check_processes

    size = options["context_parallel"]
    if size > 1 and options["compile"]:
        raise click.BadParameter("context parallelism does not run under --compile", param_hint="'--context-parallel'")
    if options["seq_len"] % size:
        raise click.BadParameter(
            f"{options['seq_len']} tokens do not split into --context-parallel {size} equal pieces",
            param_hint="'--seq-len'",
        )
    try:
        check_processes(processes, size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--context-parallel'") from None


def resolve_run(ctx: click.Context, out: Path, options: dict[str, Any], processes: int = 1) -> bool:
    """Check ``out`` against ``--resume`` and, when resuming, take the run's settings from its ``config.json``;
    return whether training continues from a checkpoint.

    A new run must not start over an existing one, and a resumed run must exist: a ``config.json`` (a run killed
    before its first checkpoint starts again from step 0 with its settings) or a checkpoint. A resumed run keeps the
    settings that decide its batches and model (:data:`FIXED_ON_RESUME`; one given with another value is an error);
    the others (``--steps``, ``--eval-every``, ``--eval-batches``...) may change. Settings not given are the run's.
    ``--batch`` and ``--accumulate`` may change with the number of data-parallel ranks (``processes`` over
    ``--context-parallel``) only if the global batch (batch x accumulate x ranks) stays the run's, so that the run
    goes on with the same samples.
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
    run_global = saved.get("global_batch", saved.get("batch"))  # runs made before ranks and accumulation: batch
    ranks, uneven = divmod(processes, options["context_parallel"])  # uneven: check_context_parallel refuses it
    if not uneven and options["batch"] * options["accumulate"] * ranks != run_global:
        raise click.UsageError(
            f"--resume continues a run with its own global batch of {run_global} sequences (batch x accumulate x "
            f"ranks); --batch {options['batch']} x --accumulate {options['accumulate']} x {ranks} rank(s) is "
            f"{options['batch'] * options['accumulate'] * ranks}: pass a --batch and --accumulate whose product "
            f"with the number of ranks is {run_global}"
        )
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
    """:func:`titans_compose.train.run.make_task`, with a setting the task cannot use as a usage error naming the
    option, and skipped ``--data`` files named on stderr."""
    from titans_compose.train.run import OptionError
    from titans_compose.train.run import make_task as make

    try:
        return make(options, warn=lambda line: click.echo(line, err=True))
    except OptionError as exc:
        raise click.BadParameter(exc.message, param_hint=f"'{exc.option}'") from None


def run(
    module: torch.nn.Module,
    source: BatchSource,
    val_batches: list[Batch],
    describe: str,
    options: dict[str, Any],
    config: dict[str, Any],
    out: Path,
    from_checkpoint: bool,
    world: World | None = None,
) -> int:
    """Train (continuing from the newest checkpoint in ``out`` if ``from_checkpoint``), write ``metrics.json`` and
    ``metrics.csv`` to ``out`` and print a summary (rank 0 of several only)."""
    import torch

    from titans_compose.train.checkpoint import CheckpointError
    from titans_compose.train.distributed import World
    from titans_compose.train.loop import TrainingError
    from titans_compose.train.run import run_training, write_metrics

    device = options["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        module = module.to(device)
    except (RuntimeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="'--device'") from None
    world = world or World()
    if world.writes:
        split = f", context parallel {options['context_parallel']}" if options["context_parallel"] > 1 else ""
        ranks = f" x {world.size} ranks ({options['parallel']}{split})" if world.size > 1 else ""
        click.echo(f"training on {device}{ranks}: {describe}", err=True)
    try:
        result = run_training(module, source, val_batches, options, out, from_checkpoint)
    except (CheckpointError, TrainingError) as exc:
        raise click.ClickException(str(exc)) from None
    if not world.writes:
        return 0
    final = write_metrics(out, config, describe, result)
    loss, speed = result.recent(10)
    click.echo(f"trained {options['steps']} steps: {describe}")
    click.echo(f"  train loss {loss:.4f} (mean of the last {min(10, len(result.history))} steps)")
    click.echo("  " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
    click.echo(f"  {speed:,.0f} tokens/s on {device}")
    click.echo(f"wrote {out}/ (config.json, metrics.json, metrics.csv, build/, checkpoints/)")
    return 0
