"""Sweep files: a base spec and axes of overrides, expanded into points, every one validated before anything runs.

A sweep file is YAML (loaded safely, with a source map) with these keys:

- ``base``: the spec every point starts from (a path relative to the sweep file);
- ``set: {path: value}``: overrides for every point;
- ``variants: [{name: ..., set: {path: value}}]``: named sets of overrides;
- ``grid: {path: [values]}``: every combination of the values;
- ``zip: {path: [values]}``: the i-th values of all paths together (equal lengths);
- ``train``: optional; the options of ``titans-compose train`` (same names, types and defaults) plus ``minutes``,
  a wall-clock cap per point (``steps`` still sets the learning-rate schedule). Without it points are only built;
- ``name``, ``description``, ``seed`` (the weights' and batches' seed, default 0).

The points are the product variants x grid x zip, in that order. Every override is a ``--set path=value`` of the
spec loader (paths reach into blocks: ``blocks.0.kind``), located at the line of the sweep file that wrote it, so a
bad point is reported like a bad spec.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import click
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from titans_compose.click_types import SEED
from titans_compose.errors import Diagnostic, Location, SpecError, dedupe, did_you_mean
from titans_compose.registry import Registry
from titans_compose.spec import LoadedSpec, load_spec
from titans_compose.spec.loader import read_spec_file
from titans_compose.spec.models import NAME_HELP, SafeName
from titans_compose.spec.source import SourceDoc
from titans_compose.spec.validate import pydantic_diagnostic

#: every point is validated before anything runs, so the product of the axes is capped before it is enumerated
MAX_POINTS = 1000

#: ``titans-compose train`` options a sweep's ``train`` section does not take: they concern one run's files, output
#: or spec, or the sweep sets them itself (``seed``; evaluation once, after the last step; one process, so no
#: ``parallel`` or ``context_parallel``)
NOT_TRAIN_KEYS = frozenset(
    {
        "out",
        "resume",
        "device",
        "no_progress",
        "eval_every",
        "seed",
        "overrides",
        "sub_plugins",
        "sub_debug",
        "parallel",
        "context_parallel",
    }
)


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="the variant's name in the results")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides: spec path -> value")


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="the base spec, relative to the sweep file")
    name: SafeName | None = Field(
        None, description=f"the sweep's name, and its output folder sweeps/<name> (default: the file name): {NAME_HELP}"
    )
    description: str | None = None
    seed: int = Field(
        0, ge=SEED.min, le=SEED.max, description="seed for every point's weights and batches (torch's range)"
    )
    set: dict[str, Any] = Field(default_factory=dict, description="overrides for every point")
    variants: list[Variant] = Field(default_factory=list, description="named sets of overrides")
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict, description="every combination of these values"
    )
    zip: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict, description="these values taken together, position by position"
    )
    train: dict[str, Any] | None = Field(None, description="titans-compose train options, plus minutes")


@dataclass(frozen=True)
class Point:
    """One point of a sweep: its name, the axis values that define it, and its overrides with their locations."""

    name: str
    settings: dict[str, Any]
    overrides: tuple[tuple[str, Location], ...]


@dataclass(frozen=True)
class Planned:
    """A validated point: the point, its loaded spec, and the key of its result (:func:`point_key`)."""

    point: Point
    loaded: LoadedSpec
    key: str


@dataclass
class Plan:
    """A validated sweep: every point with its loaded spec, and the resolved training options (None: build only)."""

    source: Path
    name: str
    base: Path
    seed: int
    points: list[Planned]
    train: dict[str, Any] | None = None
    description: str | None = None
    axes: list[str] = field(default_factory=list)
    warnings: list[Diagnostic] = field(default_factory=list)


#: ``train`` options added after results were first keyed, with their defaults: left out of a point's key while at
#: their default, so that the results of a sweep recorded before they existed keep their keys
LATER_TRAIN_DEFAULTS: dict[str, Any] = {
    "tokens": None,
    "separator": None,
    "precision": "fp32",
    "accumulate": 1,
    "activation_checkpointing": False,
    "compile": False,
}


def point_key(loaded: LoadedSpec, seed: int, train: dict[str, Any] | None) -> str:
    """The key of a point's result: its resolved spec, seed and training options (budget included)."""
    from titans_compose.builder import spec_hash

    if train is not None:
        train = {k: v for k, v in train.items() if k not in LATER_TRAIN_DEFAULTS or v != LATER_TRAIN_DEFAULTS[k]}
    data = {"spec_sha256": spec_hash(loaded), "seed": seed, "train": train}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def yaml_value(value: Any) -> str:
    """``value`` as one line of YAML that reads back as the same value (what ``--set path=value`` parses)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 20)
    return text.removesuffix("\n...\n").strip()


def _override(path: str, value: Any, where: Location | None, source: Path) -> tuple[str, Location]:
    return f"{path}={yaml_value(value)}", where or Location(str(source))


def expand(sweep: SweepFile, doc: SourceDoc, source: Path) -> list[Point]:
    """The points of ``sweep`` (variants x grid x zip), each with located overrides (common ``set`` first)."""
    common = [_override(p, v, doc.location(("set", p)), source) for p, v in sweep.set.items()]
    variants: list[tuple[str | None, list[tuple[str, Location]]]] = [
        (v.name, [_override(p, x, doc.location(("variants", i, "set", p)), source) for p, x in v.set.items()])
        for i, v in enumerate(sweep.variants)
    ] or [(None, [])]
    grid = [[(p, v, doc.location(("grid", p, i))) for i, v in enumerate(values)] for p, values in sweep.grid.items()]
    zipped = [
        [(p, v, doc.location(("zip", p, i))) for p, v in zip(sweep.zip, row, strict=True)]
        for i, row in enumerate(zip(*sweep.zip.values(), strict=True))
    ] or [[]]
    points = []
    for (variant, variant_overrides), combo, row in itertools.product(variants, itertools.product(*grid), zipped):
        chosen = [*combo, *row]
        settings = {path: value for path, value, _ in chosen}
        label = " ".join([*([variant] if variant else []), *(f"{p}={yaml_value(v)}" for p, v in settings.items())])
        overrides = (*common, *variant_overrides, *(_override(p, v, w, source) for p, v, w in chosen))
        points.append(Point(label or "base", {**({"variant": variant} if variant else {}), **settings}, overrides))
    return points


def _structure_problems(sweep: SweepFile, doc: SourceDoc) -> list[Diagnostic]:
    """Problems pydantic cannot see: unequal zip lengths, repeated variant names, more than :data:`MAX_POINTS`
    points (counted from the axes' lengths, before any point is made), a path on two axes."""
    problems = []
    lengths = {p: len(v) for p, v in sweep.zip.items()}
    if len(set(lengths.values())) > 1:
        problems.append(
            Diagnostic(
                "TC207",
                f"zip lists must have equal lengths, got {', '.join(f'{p}: {n}' for p, n in lengths.items())}",
                "zip",
                doc.location(("zip",)),
                "zip pairs the i-th values of every path; use grid for every combination",
            )
        )
    seen: set[str] = set()
    for i, v in enumerate(sweep.variants):
        if v.name in seen:
            problems.append(
                Diagnostic(
                    "TC207",
                    f"variant name {v.name!r} is used twice",
                    f"variants.{i}.name",
                    doc.location(("variants", i, "name")),
                    "names identify points in the results: make them unique",
                )
            )
        seen.add(v.name)
    axes = [("variants", len(sweep.variants) or 1), *((f"grid.{p}", len(v)) for p, v in sweep.grid.items())]
    axes.append(("zip", min((len(v) for v in sweep.zip.values()), default=1)))
    points = math.prod(n for _, n in axes)
    if points > MAX_POINTS:
        problems.append(
            Diagnostic(
                "TC308",
                f"the sweep has {points:,} points ({' x '.join(f'{n} {a}' for a, n in axes if n > 1)}), more than "
                f"{MAX_POINTS}",
                "grid" if sweep.grid else "",
                doc.location(("grid",), key=True) if sweep.grid else doc.location(()),
                "every point is validated, built and trained: split the sweep, or use zip for values that go together",
            )
        )
    overlap = set(sweep.grid) & set(sweep.zip)
    if overlap:
        problems.append(
            Diagnostic(
                "TC207",
                f"{', '.join(sorted(overlap))} is both a grid and a zip axis",
                "zip",
                doc.location(("zip",)),
                "give each path one axis",
            )
        )
    return problems


def _repeated_points(points: list[Planned], source: Path) -> list[Diagnostic]:
    """Points that resolve to the same model and budget (they would share one result)."""
    by_key: dict[str, list[str]] = {}
    for p in points:
        by_key.setdefault(p.key, []).append(p.point.name)
    return [
        Diagnostic(
            "TC207",
            f"points {', '.join(names)} resolve to the same spec and budget",
            location=Location(str(source)),
            hint="a point is keyed by its resolved spec: drop the repeats or make them differ",
        )
        for names in by_key.values()
        if len(names) > 1
    ]


def train_options(raw: dict[str, Any], doc: SourceDoc, source: Path) -> tuple[dict[str, Any], list[Diagnostic]]:
    """The ``train`` section checked and converted with the ``titans-compose train`` options themselves (so the
    names, types, ranges and defaults are the command's), plus ``minutes``. Paths are relative to the sweep file."""
    from titans_compose.train.options import default_warmup, training_command

    command = training_command()
    params = {p.name: p for p in command.params if isinstance(p, click.Option) and p.name not in NOT_TRAIN_KEYS}
    ctx = command.make_context("train", [], resilient_parsing=True)  # every option at its default
    options: dict[str, Any] = {name: ctx.params[name] for name in params}
    options["minutes"] = None
    problems = []
    for key, value in raw.items():
        where = doc.location(("train", key))
        if key == "minutes":
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf
            ):
                problems.append(
                    Diagnostic("TC204", f"minutes must be a positive number, got {value!r}", "train.minutes", where)
                )
            options["minutes"] = value
            continue
        if key not in params:
            problems.append(
                Diagnostic(
                    "TC201",
                    f"unknown key '{key}'",
                    f"train.{key}",
                    doc.location(("train", key), key=True),
                    did_you_mean(key, [*params, "minutes"]),
                )
            )
            continue
        if key in ("data", "tokens") and value is not None:
            value = str((source.parent / str(value)).resolve())
        try:
            options[key] = None if value is None else params[key].type_cast_value(ctx, value)
        except click.BadParameter as exc:
            problems.append(Diagnostic("TC204", f"{key}: {exc.message}", f"train.{key}", where))
    for key in ("data", "tokens"):
        if options[key] is not None:
            options[key] = str(options[key])
    if options["warmup"] is None:
        options["warmup"] = default_warmup(options["steps"])
    return options, problems


def load_plan(path: str | os.PathLike[str], registry: Registry, seed: int | None = None) -> Plan:
    """Read, expand and validate the sweep file at ``path``: the file itself, the ``train`` options and every point
    (spec schema, cross-field rules and graph passes). ``seed``, when given, replaces the file's ``seed`` (the same
    sweep over several seeds without editing it). Raises :class:`SpecError` with every problem at once; a problem
    shared by several points is reported once, naming them."""
    from titans_compose.graph import compile_graph

    source = Path(path)
    doc = read_spec_file(source, "sweep")
    raw_train = doc.data.get("train")
    options, problems = train_options(raw_train, doc, source) if isinstance(raw_train, dict) else (None, [])
    try:
        sweep = SweepFile.model_validate(doc.data)
    except ValidationError as exc:
        problems += [pydantic_diagnostic(err, doc, SweepFile) for err in exc.errors()]
        raise SpecError(dedupe(problems)) from None
    problems += _structure_problems(sweep, doc)
    if problems:
        raise SpecError(dedupe(problems))
    if seed is not None:
        sweep = sweep.model_copy(update={"seed": seed})
    base = Path(os.path.normpath(source.parent / sweep.base))
    found: dict[tuple, tuple[Diagnostic, list[str]]] = {}  # each problem or warning once, with its points
    points = []
    expanded = expand(sweep, doc, source)
    for point in expanded:
        try:
            loaded = load_spec(base, point.overrides, registry=registry)
            compile_graph(loaded)
        except SpecError as exc:
            found_in = exc.diagnostics
        else:
            found_in = loaded.warnings
            points.append(Planned(point, loaded, point_key(loaded, sweep.seed, options)))
        for d in found_in:
            found.setdefault((d.code, d.message, d.path, d.location, d.severity), (d, []))[1].append(point.name)
    grouped = [_in_points(d, names, len(expanded)) for d, names in found.values()]
    problems += [d for d in grouped if d.severity == "error"]
    problems += _repeated_points(points, source)
    if problems:
        raise SpecError(dedupe(problems))
    axes = [*(["variant"] if sweep.variants else []), *sweep.grid, *sweep.zip]
    name = sweep.name or source.stem
    warnings = dedupe(d for d in grouped if d.severity != "error")
    return Plan(source, name, base, sweep.seed, points, options, sweep.description, axes, warnings)


def _in_points(d: Diagnostic, names: list[str], total: int) -> Diagnostic:
    """``d`` saying which points it was found in."""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    where = "every point" if len(names) == total > 1 else f"point{'s' if len(names) > 1 else ''} {shown}"
    return replace(d, message=f"{d.message} (in {where})")
