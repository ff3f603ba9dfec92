"""``titans-compose sweep``: build, train and evaluate every point of a sweep file, with resumable results."""

from __future__ import annotations

from pathlib import Path

import click

from titans_compose.cli.main import (
    common_options,
    device_option,
    echo_diagnostics,
    guarded,
    model_registry,
    out_option,
    settings,
)
from titans_compose.click_types import SEED


@click.command()
@click.argument("sweep_file", metavar="SWEEP", type=click.Path(dir_okay=False))
@out_option(
    "out",
    "Results directory [default: sweeps/<sweep name>]. Finished points there are not run again.",
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option("--retry-failed", is_flag=True, help="Run the points recorded as failed again.")
@click.option("--dry-run", is_flag=True, help="Validate every point and list them; run nothing.")
@click.option(
    "--seed",
    type=SEED,
    help="The seed of every point's weights and batches, instead of the file's `seed` (one sweep, several seeds).",
)
@device_option
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@common_options
@click.pass_context
def sweep(
    ctx: click.Context,
    sweep_file: str,
    out: Path | None,
    retry_failed: bool,
    dry_run: bool,
    seed: int | None,
    device: str | None,
    no_progress: bool,
    sub_plugins: tuple[str, ...],
    sub_debug: bool,
) -> None:
    """Run SWEEP: every point (base spec x variants x grid x zip) is validated first, then built and, with a
    `train` section, trained for its budget and evaluated. Writes results.json, results.csv, plot.png and a folder
    per point (points/<key>/: its result and training metrics) to --out and prints the table; an interrupted sweep
    resumes from its results, saying which points it skips. One sweep at a time holds --out."""
    plugins, debug = settings(ctx, sub_plugins, sub_debug)

    def body() -> int:
        from titans_compose.io import default_dir
        from titans_compose.sweep import SweepError, load_plan, make_sweep_task, plot, run_sweep, table
        from titans_compose.sweep.run import RESULTS_JSON

        registry = model_registry(plugins, debug)
        if registry is None:
            return 1
        plan = load_plan(sweep_file, registry, seed)
        echo_diagnostics(plan.warnings)
        task = make_sweep_task(plan)
        what = "built only" if task is None else task.describe
        click.echo(f"sweep {plan.name}: {len(plan.points)} points from {plan.base} ({what})", err=True)
        if dry_run:
            for p in plan.points:
                click.echo(f"{p.key}  {p.point.name}")
            return 0
        import torch

        target = out or default_dir("sweeps", plan.name)
        try:
            records = run_sweep(
                plan,
                target,
                plugins=plugins,
                device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                retry_failed=retry_failed,
                progress=not no_progress,
                task=task,
                say=lambda line: click.echo(line, err=True),
            )
        except SweepError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            results = target / RESULTS_JSON
            where = f"finished points are in {results}" if results.is_file() else "no point had finished"
            click.echo(f"\ninterrupted: {where}; run the same command to resume", err=True)
            return 130
        click.echo(table(records))
        click.echo(plot(records, target / "plot.png", f"{plan.name}: {what}"), err=True)
        failed = sum(r["status"] != "ok" for r in records)
        click.echo(
            f"wrote {target}/ (results.json, results.csv); {len(records) - failed} ok, {failed} failed", err=True
        )
        return 0

    guarded(ctx, debug, body)
