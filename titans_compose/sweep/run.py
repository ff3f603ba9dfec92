"""Running a sweep: each point built (and, with a ``train`` section, trained and evaluated) in order, its result
written as soon as it is known, so an interrupted sweep resumes where it stopped.

A point is keyed by the sha256 of its resolved spec, the seed and the training options (the budget included):
a point whose key already has a result in the output directory is not run again, and a changed point (another
value, another budget) gets a new key. A point that fails is recorded with its error and the sweep goes on; a
rerun keeps the failure unless asked to retry it. Each finished point also has a folder ``points/<key>/`` with its
record (``result.json``) and, when trained, its per-step history and evaluations (``metrics.json``); the folders of
points a changed sweep file no longer has stay. One sweep at a time holds the output directory.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from titans_compose.errors import Diagnostic, Location, SpecError
from titans_compose.io import atomic_write
from titans_compose.lock import locked
from titans_compose.spec import LoadedSpec
from titans_compose.sweep.plan import Plan, Point, yaml_value

FORMAT = "titans-compose-sweep"
FORMAT_VERSION = 1
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
PLOT = "plot.png"
#: the folder of per-point folders, ``points/<key>/``
POINTS = "points"
#: a result's measurements, in table order (a point's axis values come before them)
METRICS = (
    "parameters",
    "backend",
    "steps",
    "seconds",
    "tokens_per_s",
    "train_loss",
    "val_loss",
    "val_bits_per_byte",
    "val_answer_loss",
    "val_accuracy",
)


class SweepError(RuntimeError):
    """The sweep cannot run (e.g. its output directory holds something else); the message says which file."""


@dataclass
class Task:
    """What every trained point is trained and evaluated on: batches by step, validation batches, a description."""

    source: Callable[[int], Any]
    val_batches: list[Any]
    describe: str
    max_token: int


def make_sweep_task(plan: Plan) -> Task | None:
    """The task of ``plan``'s ``train`` section (None without one); a setting the task rejects (e.g. a sequence too
    short for the pass key) is a :class:`SpecError` located at the sweep file's ``train`` section."""
    if plan.train is None:
        return None
    from titans_compose.train.run import OptionError, make_task

    # as in train: batch is one micro-batch, and a step takes accumulate of them (one process)
    options = {**plan.train, "seed": plan.seed, "batch": plan.train["batch"] * plan.train["accumulate"]}
    try:
        source, val_batches, describe, top = make_task(options, warn=lambda line: click.echo(line, err=True))
    except OptionError as exc:
        key = exc.option.strip("-").replace("-", "_")
        raise SpecError([Diagnostic("TC207", exc.message, f"train.{key}", Location(str(plan.source)))]) from None
    return Task(source, val_batches, describe, top)


def run_point(
    point: Point, loaded: LoadedSpec, plan: Plan, task: Task | None, plugins: list[str], device: str
) -> dict[str, Any]:
    """Build ``point`` (smoke-checked) and, with a task, train it for the plan's budget and evaluate it at the end.
    Returns the measurements (:data:`METRICS`, those that apply) and, when trained, ``metrics``: the per-step
    history and the evaluations; raises whatever the build or training raises."""
    import torch

    from titans_compose.builder import build
    from titans_compose.train.loop import train
    from titans_compose.train.run import eval_unit, evaluate, loop_options
    from titans_compose.train.tasks import check_vocabulary
    from titans_compose.train.tokens import check_token_vocabulary

    tokens = None if plan.train is None else plan.train.get("tokens")
    if task is not None and tokens is None:
        check_vocabulary(loaded.spec.model.vocab_size, task.max_token, task.describe)
    elif task is not None:
        check_token_vocabulary(loaded.spec.model.vocab_size, task.max_token, tokens)
    started = time.perf_counter()
    built = build(loaded, plugins=plugins, seed=plan.seed)
    backends = sorted({backend for _, backend, _ in built.report.backends})
    out: dict[str, Any] = {"parameters": built.report.total_parameters, "backend": "+".join(backends) or "none"}
    if task is None or plan.train is None:
        out["seconds"] = time.perf_counter() - started
        return out
    options = plan.train
    module = built.module.to(device)
    torch.manual_seed(plan.seed)
    unit = eval_unit(options)
    result = train(
        module,
        task.source,
        **loop_options(options),
        eval_fn=lambda model: evaluate(model, task.val_batches, unit),
        progress=False,
        time_limit=None if options["minutes"] is None else 60 * options["minutes"],
    )
    loss, speed = result.recent(10)
    final = result.evals[-1][1]
    out.update(steps=len(result.history), tokens_per_s=speed, train_loss=loss, **final, metrics=result.to_json())
    out["seconds"] = time.perf_counter() - started
    return out


Runner = Callable[[Point, LoadedSpec, Plan, "Task | None", list[str], str], dict[str, Any]]


def read_results(out: Path) -> dict[str, dict[str, Any]]:
    """The results already in ``out`` by key (none if there is no results file); a results file that is not a
    sweep's is refused."""
    path = out / RESULTS_JSON
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SweepError(
            f"{path} is not readable JSON ({exc}): move it away or choose another output directory"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SweepError(f"{path} is not a titans-compose sweep's results: choose another output directory")
    if data.get("format_version") != FORMAT_VERSION:
        raise SweepError(
            f"{path}: sweep results format version {data.get('format_version')!r}, this titans-compose writes "
            f"{FORMAT_VERSION}: choose another output directory"
        )
    return {r["key"]: r for r in data.get("points", [])}


def write_results(plan: Plan, records: list[dict[str, Any]], out: Path, task: Task | None) -> None:
    """``results.json`` (the plan and every finished point) and ``results.csv`` (one row per point), atomically."""
    import csv
    import io

    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sweep": plan.name,
        "file": str(plan.source),
        "base": str(plan.base),
        "seed": plan.seed,
        "axes": plan.axes,
        "train": plan.train,
        "task": None if task is None else task.describe,
    }
    atomic_write(out / RESULTS_JSON, json.dumps({**header, "points": records}, indent=1) + "\n")
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["key", "point", *plan.axes, "status", *METRICS, "error"])
    for r in records:
        writer.writerow(
            [
                r["key"],
                r["name"],
                *(yaml_cell(r["settings"].get(a)) for a in plan.axes),
                r["status"],
                *("" if r.get(m) is None else r[m] for m in METRICS),
                r.get("error") or "",
            ]
        )
    atomic_write(out / RESULTS_CSV, table.getvalue())


def write_point(out: Path, record: dict[str, Any], metrics: dict[str, Any] | None) -> None:
    """The point's folder ``points/<key>/``: ``result.json`` (its record) and, when trained, ``metrics.json``."""
    folder = out / POINTS / record["key"]
    if metrics is not None:
        atomic_write(folder / "metrics.json", json.dumps({"name": record["name"], **metrics}, indent=1) + "\n")
    atomic_write(folder / "result.json", json.dumps(record, indent=1) + "\n")


def yaml_cell(value: Any) -> str:
    return "" if value is None else yaml_value(value)


def run_sweep(
    plan: Plan,
    out: Path,
    *,
    plugins: list[str],
    device: str = "cpu",
    retry_failed: bool = False,
    progress: bool = True,
    runner: Runner = run_point,
    task: Task | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> list[dict[str, Any]]:
    """Run every point of ``plan`` not already finished in ``out``, writing the results after each one.

    Returns one record per point, in the plan's order: ``key``, ``name``, ``settings``, ``status`` (``ok`` or
    ``failed``), ``error`` and the measurements. A point that raises is recorded as failed and the sweep goes on;
    a KeyboardInterrupt stops it with every finished point saved. ``task`` is the plan's training task (made with
    :func:`make_sweep_task` if not given). ``say`` gets a line naming the points not run because they are done.
    Raises :class:`SweepError` if another sweep holds ``out``."""
    from tqdm.auto import tqdm

    task = task if task is not None else make_sweep_task(plan)
    with locked(out, "sweep", SweepError):
        done = read_results(out)
        records: dict[str, dict[str, Any]] = {
            p.key: done[p.key]
            for p in plan.points
            if p.key in done and (done[p.key]["status"] == "ok" or not retry_failed)
        }
        for status, why in (("ok", "finished earlier"), ("failed", "failed earlier; --retry-failed runs them again")):
            names = [records[p.key]["name"] for p in plan.points if records.get(p.key, {}).get("status") == status]
            if names:
                say(f"skipping {len(names)} point(s) {why} (results in {out / RESULTS_JSON}): {'; '.join(names)}")

        def ordered() -> list[dict[str, Any]]:
            return [records[p.key] for p in plan.points if p.key in records]

        todo = [p for p in plan.points if p.key not in records]
        total = len(plan.points)
        bar = tqdm(total=total, initial=total - len(todo), disable=not progress, unit="point", dynamic_ncols=True)
        try:
            for p in todo:
                bar.set_postfix_str(p.point.name)
                record: dict[str, Any] = {"key": p.key, "name": p.point.name, "settings": p.point.settings}
                metrics = None
                try:
                    measured = runner(p.point, p.loaded, plan, task, plugins, device)
                    metrics = measured.pop("metrics", None)
                    record.update(status="ok", error=None, **measured)
                except Exception as exc:
                    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
                    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
                    message = " ".join(str(exc).split()) or "no message"
                    record.update(status="failed", error=f"{type(exc).__name__}: {message}{at}")
                write_point(out, record, metrics)
                records[p.key] = record
                write_results(plan, ordered(), out, task)
                bar.update(1)
        finally:
            bar.close()
        write_results(plan, ordered(), out, task)
        return ordered()
