"""Building a spec: compile it into a PyTorch module, check that it can train, and keep a verifiable record.

:func:`build` loads a spec, compiles its graph, builds the module with weights that depend only on the seed, runs a
one-step smoke check and, given a directory, writes the build there. A build directory holds ``spec.resolved.yaml``,
``weights.safetensors`` (the initial weights), ``graph.dot``, ``graph.mmd``, ``report.json`` and, written last,
``manifest.json`` with the sha256 of every other file and of the resolved spec, so a build with a manifest is
complete and any later change is detected. :func:`load_build` verifies a build directory and rebuilds the identical
module from it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from safetensors import SafetensorError, TensorSpec, serialize
from safetensors.torch import load as load_tensors

from titans_compose.errors import SpecError
from titans_compose.manifest import (
    MANIFEST,
    Header,
    Plugin,
    Sha256,
    read_verified,
    sha256,
    versions,
    write_with_manifest,
)
from titans_compose.manifest import check_output_dir as check_dir
from titans_compose.ops.memory.codegen.cache import cache_dir
from titans_compose.ops.memory.finite import MemoryDivergedError
from titans_compose.registry import ENTRY_POINT_GROUP, Registry
from titans_compose.spec import LoadedSpec, load_spec

FORMAT = "titans-compose-build"
#: 2: plug-ins recorded as kind, name and sha256 (version 1 recorded absolute paths)
FORMAT_VERSION = 2
SPEC_FILE = "spec.resolved.yaml"
WEIGHTS_FILE = "weights.safetensors"
REPORT_FILE = "report.json"
#: every file of a build except the manifest, which lists their hashes
BUILD_FILES = (SPEC_FILE, WEIGHTS_FILE, "graph.dot", "graph.mmd", REPORT_FILE)
#: the smoke check's random token batch [batch, time]: long enough to cross chunk and segment boundaries
SMOKE_SHAPE = (2, 64)


class BuildError(RuntimeError):
    """A build could not be made, written or loaded; the message says which file or check and why."""


class ModelHeader(Header):
    """The manifest fields of a directory that holds a model (a build or an exported artifact)."""

    spec: str
    spec_sha256: Sha256
    seed: int
    plugins: list[Plugin]


@dataclass(frozen=True)
class SmokeCheck:
    """One forward and backward pass on random tokens: the next-token loss, the gradient norm, and the time taken
    (the model's first call, so it includes torch's one-time set-up)."""

    loss: float
    finite: bool
    grad_norm: float
    seconds: float


@dataclass
class BuildReport:
    """What was built: the spec, parameter counts, the graph, the memory backends, kernels and the smoke check."""

    spec_name: str
    spec_source: str
    seed: int
    parameters: list[tuple[str, int]]  # (component, count)
    total_parameters: int
    layers: list[tuple[int, str, int]]  # (index, block kind, graph nodes)
    graph_nodes: int
    passes: list[str]
    backends: list[tuple[str, str, str]]  # (memory layer, backend, reason)
    kernels: str
    smoke: SmokeCheck | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildReport:
        smoke = data["smoke"]
        return cls(
            **{
                **data,
                "parameters": [tuple(p) for p in data["parameters"]],
                "layers": [tuple(layer) for layer in data["layers"]],
                "backends": [tuple(b) for b in data["backends"]],
                "smoke": None if smoke is None else SmokeCheck(**smoke),
            }
        )

    def summary(self, graph: str | None = None) -> str:
        """The report as the text ``titans-compose build`` prints; ``graph`` (e.g. Mermaid text) replaces the table
        of layers."""
        width = max([len("total"), *(len(name) for name, _ in self.parameters)])
        lines = [f"built {self.spec_name} from {self.spec_source} (seed {self.seed})", "parameters:"]
        lines += [f"  {name:<{width}}  {count:>12,}" for name, count in self.parameters]
        lines.append(f"  {'total':<{width}}  {self.total_parameters:>12,}")
        lines.append(f"layers: {len(self.layers)} ({self.graph_nodes} graph nodes in all)")
        if graph is None:
            lines += [f"  {index:<3} {kind:<10} {nodes:>3} nodes" for index, kind, nodes in self.layers]
        else:
            lines.append(graph.rstrip("\n"))
        lines.append(f"passes: {', '.join(self.passes)}")
        if self.backends:
            lines.append("memory backends:")
            lines += [f"  {layer}: {backend} ({reason})" for layer, backend, reason in self.backends]
        lines.append(self.kernels)
        if self.smoke is None:
            lines.append("smoke check: skipped")
        else:
            s = self.smoke
            lines.append(
                f"smoke check: loss {s.loss:.4f}, {'finite' if s.finite else 'NOT finite'}, "
                f"grad norm {s.grad_norm:.4f}, {s.seconds:.2f} s"
            )
        return "\n".join(lines)


@dataclass
class BuildResult:
    """A built model with its report, graph IR and loaded spec; ``path`` is the build directory, if one was written."""

    module: torch.nn.Module
    report: BuildReport
    graph: nx.DiGraph
    loaded: LoadedSpec
    path: Path | None = None


def make_module(graph: nx.DiGraph, loaded: LoadedSpec) -> torch.nn.Module:
    """The PyTorch model for a compiled graph."""
    from titans_compose.nn.model import TitansLM

    return TitansLM.from_graph(graph, loaded)


def seeded_module(graph: nx.DiGraph, loaded: LoadedSpec, seed: int) -> torch.nn.Module:
    """The module with weights drawn from torch's generator seeded with ``seed``; the caller's random state is kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_module(graph, loaded)


def kernels_line(backends: Sequence[tuple[str, str, str]]) -> str:
    """Which kernels the memory layers ran, read from their backends: after the smoke check, the backend each layer
    chose for the tensors it ran on (``auto`` for a layer that has not run yet)."""
    if not backends:
        return "kernels: none generated (the model has no memory layers)"
    layers: dict[str, list[str]] = {}
    for layer, backend, _ in backends:
        layers.setdefault(backend, []).append(layer)

    def which(name: str) -> str:
        return "every memory layer" if len(layers[name]) == len(backends) else ", ".join(layers[name])

    parts = []
    for name in sorted(layers, key=lambda n: (n != "triton", n)):  # generated kernels first
        if name == "triton":
            parts.append(f"generated Triton kernels for {which(name)} (sources in {cache_dir()})")
        elif name == "auto":
            parts.append(f"chosen at the first forward pass for {which(name)}")
        else:
            parts.append(f"the {name} PyTorch path for {which(name)}")
    return ("kernels: " if "triton" in layers else "kernels: none generated; ") + "; ".join(parts)


def smoke_check(module: torch.nn.Module, vocab_size: int, seed: int) -> SmokeCheck:
    """One forward and backward pass on a random token batch with the next-token cross-entropy loss.

    Gradients are cleared afterwards and no step is taken, so the weights are unchanged. Raises :class:`BuildError`
    if a memory layer diverges or the loss or the gradient is not finite: such a model cannot train.
    """
    tokens = torch.randint(vocab_size, SMOKE_SHAPE, generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    try:
        logits = module(tokens).logits
    except MemoryDivergedError as exc:
        raise BuildError(f"smoke check failed: {exc}; the model as specified cannot train") from None
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else 0.0
    seconds = time.perf_counter() - start
    module.zero_grad(set_to_none=True)
    loss_value, norm_value = float(loss.detach()), float(grad_norm)
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    if not finite:
        raise BuildError(
            f"smoke check failed: loss {loss_value}, gradient norm {norm_value} on a random "
            f"{SMOKE_SHAPE[0]}x{SMOKE_SHAPE[1]} token batch; the model as specified cannot train"
        )
    return SmokeCheck(loss_value, finite, norm_value, seconds)


def build(
    spec: str | os.PathLike[str] | LoadedSpec,
    overrides: Sequence[str] = (),
    plugins: Sequence[str] = (),
    *,
    output_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    smoke: bool = True,
) -> BuildResult:
    """Compile ``spec`` (a path, with ``overrides`` and ``plugins``, or an already loaded spec) into a module.

    The module's weights are drawn with torch seeded by ``seed``, so they depend only on the spec and the seed.
    With ``smoke`` a forward and backward pass checks the model can train. With ``output_dir`` the build is written
    there (see the module docstring); a path that is a file, or a non-empty directory that is not a build, is
    refused before anything is built. Raises :class:`SpecError` for spec problems, :class:`BuildError` otherwise.
    With a loaded spec, ``plugins`` only names the plug-ins it was loaded with (for :func:`load_build`).
    """
    if isinstance(spec, LoadedSpec) and overrides:
        raise ValueError("overrides apply when a spec is loaded: pass them to load_spec, or pass the spec's path")
    loaded = spec if isinstance(spec, LoadedSpec) else _load(spec, overrides, plugins)
    target = None if output_dir is None else Path(output_dir)
    if target is not None:
        check_output_dir(target, Path(loaded.source))
    from titans_compose.graph import compile_graph

    graph, passes = compile_graph(loaded)
    module = seeded_module(graph, loaded, seed)
    weights = {name: t.detach().cpu().clone().contiguous() for name, t in module.state_dict().items()}
    check = smoke_check(module, loaded.spec.model.vocab_size, seed) if smoke else None
    backends = [tuple(b) for b in module.memory_backends()]
    sizes = Counter(layer for _, layer in graph.nodes(data="layer"))
    report = BuildReport(
        spec_name=spec_name(loaded),
        spec_source=loaded.source,
        seed=seed,
        parameters=[tuple(c) for c in module.components()],
        total_parameters=sum(p.numel() for p in module.parameters()),
        layers=[(rec["index"], rec["kind"], sizes[rec["index"]]) for rec in graph.graph["layers"]],
        graph_nodes=graph.number_of_nodes(),
        passes=list(passes.ran),
        backends=backends,
        kernels=kernels_line(backends),
        smoke=check,
    )
    result = BuildResult(module, report, graph, loaded)
    if target is not None:
        write_build(result, weights, target, plugins)
        result.path = target
    return result


def spec_name(loaded: LoadedSpec) -> str:
    """The spec's ``name``, or its file name without the extension."""
    return loaded.spec.name or Path(loaded.source).stem


def _load(path: str | os.PathLike[str], overrides: Sequence[str], plugins: Sequence[str]) -> LoadedSpec:
    from titans_compose.registry import default_registry

    registry, problems = default_registry(plugins)
    if problems:
        raise SpecError(problems)
    return load_spec(path, overrides, registry=registry)


def check_output_dir(path: Path, spec: Path) -> None:
    """Refuse to write a build onto a file, over the ``spec`` being built, or into a non-empty directory that is not
    exactly an earlier build (a manifest of ours and only the files it lists)."""
    check_dir(path, FORMAT, "build", BuildError, BUILD_FILES, spec)


#: spec fields added after builds were first written (paths inside a section set: the model-wide sections or a
#: block), with the value that computes what builds before them computed: left out of the hash at that value, so
#: those builds still verify, and hashes of specs that set them otherwise differ
LATER_FIELDS: dict[tuple[str, ...], Any] = {
    ("update", "lr", "scale"): "none",
    ("update", "momentum", "form"): "paper",
}


def spec_hash(loaded: LoadedSpec) -> str:
    """The sha256 of the resolved spec as canonical JSON: equal for equal models, whatever file or layout they
    were written in (:data:`LATER_FIELDS` at their older value left out)."""
    data = loaded.spec.model_dump(mode="json", exclude={"extends"})
    for sections in [data, *data["blocks"]]:
        for (*parents, name), older in LATER_FIELDS.items():
            parent = sections
            for key in parents:
                parent = parent.get(key) if isinstance(parent, dict) else None
            if isinstance(parent, dict) and parent.get(name) == older:
                del parent[name]
    return sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """``tensors`` (contiguous, on the CPU) in the safetensors format. Like ``safetensors.torch.save`` this hands the
    tensors' memory to the serializer, but not through NumPy, which ``save`` needs and this project does not."""
    if sys.byteorder != "little":
        raise BuildError("writing weights needs a little-endian machine (the safetensors byte order)")
    specs = {
        name: TensorSpec(
            dtype=str(t.dtype).removeprefix("torch."),
            shape=list(t.shape),
            data_ptr=t.data_ptr(),
            data_len=t.numel() * t.element_size(),
        )
        for name, t in tensors.items()
    }
    return serialize(specs, metadata=metadata)


def write_build(result: BuildResult, weights: dict[str, torch.Tensor], path: Path, plugins: Sequence[str]) -> None:
    """Write the build files atomically, then the manifest with their hashes, so a manifest means a whole build."""
    from titans_compose.graph.render import collapse_repeats, to_dot, to_mermaid

    shown = collapse_repeats(result.graph)
    files: dict[str, bytes] = {
        SPEC_FILE: result.loaded.resolved_yaml().encode("utf-8"),
        WEIGHTS_FILE: safetensors_bytes(weights, metadata={"format": FORMAT, "seed": str(result.report.seed)}),
        "graph.dot": to_dot(shown).encode("utf-8"),
        "graph.mmd": to_mermaid(shown).encode("utf-8"),
        REPORT_FILE: (json.dumps(result.report.to_json(), indent=2) + "\n").encode("utf-8"),
    }
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": result.report.spec_name,
        "spec_sha256": spec_hash(result.loaded),
        "seed": result.report.seed,
        "plugins": plugin_records(plugins, result.loaded.registry),
        "versions": versions(),
    }
    write_with_manifest(path, files, header)


def plugin_records(plugins: Sequence[str], registry: Registry | None = None) -> list[dict[str, Any]]:
    """How a manifest records the plug-ins a model was made with (see :class:`~titans_compose.manifest.Plugin`):
    a ``--plugin`` file by its file name and sha256, which do not depend on where it lay (a loader is given the
    file and checks it), a module by its name and, given the ``registry``, each entry-point plug-in that registered
    something in it by its entry-point name."""
    records = []
    for target in plugins:
        path = Path(target)
        if path.is_file():
            records.append({"kind": "file", "name": path.name, "sha256": sha256(path.read_bytes())})
        else:
            kind = "file" if target.endswith(".py") else "module"  # a missing file: named, never matched
            records.append({"kind": kind, "name": target, "sha256": None})
    if registry is not None:
        from importlib.metadata import entry_points

        sources = {entry.source for entry in registry.entries()}
        records += [
            {"kind": "entry_point", "name": ep.name, "sha256": None}
            for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
            if f"plugin {ep.name}" in sources and ep.name not in plugins
        ]
    return records


def _identity(record: dict[str, Any]) -> tuple[str, str | None]:
    """What a given plug-in must share with a recorded one: a file its contents, a module its name."""
    return record["kind"], record["sha256"] if record["kind"] == "file" else record["name"]


def _describe(record: dict[str, Any]) -> str:
    if record["kind"] == "module":
        return f"module {record['name']}"
    return f"file {record['name']} (sha256 {record['sha256'][:12]}…)"


def check_plugins(
    root: Path, manifest: dict[str, Any], plugins: Sequence[str], what: str, error: type[Exception]
) -> None:
    """Refuse, before anything is imported, a directory whose model was made with a plug-in file or module that is
    not among ``plugins``: loading imports only what its caller names (a file matches by content, wherever it
    lies). Entry-point plug-ins are installed code that every run loads anyway, so they are not asked for."""
    given = {_identity(record) for record in plugin_records(plugins)}
    missing = [r for r in manifest["plugins"] if r["kind"] != "entry_point" and _identity(r) not in given]
    if not missing:
        return
    named = ", ".join(_describe(record) for record in missing)
    differ = sorted({p for p in plugins for r in missing if r["kind"] == "file" and Path(p).name == r["name"]})
    note = f" ({', '.join(differ)} given, but with other contents)" if differ else ""
    raise error(
        f"{root / MANIFEST}: the {what} was made with the plug-in {named}{note}, which was not passed; loading "
        f"imports no plug-in that the {what} names: if you trust it, pass it yourself (--plugin FILE_OR_MODULE on "
        "the command line, plugins=[...] in Python)"
    )


def load_build(path: str | os.PathLike[str], plugins: Sequence[str] = ()) -> BuildResult:
    """Verify the build in ``path`` and rebuild its module with the saved weights.

    Every file in the directory must be listed in the manifest and match its sha256, and the format version must
    be this one; a missing, changed or unlisted file is refused with a :class:`BuildError` naming it. The module
    is rebuilt from ``spec.resolved.yaml`` with ``plugins``, which must include every plug-in file or module the
    build was made with (none is imported on the manifest's word; see :func:`check_plugins`), and the weights are
    loaded strictly. The report is the one recorded at build time.
    """
    root = Path(path)
    remedy = "build the spec again"
    manifest, data = read_verified(
        root, ModelHeader, FORMAT, FORMAT_VERSION, list(BUILD_FILES), what="build", remedy=remedy, error=BuildError
    )
    check_plugins(root, manifest, plugins, "build", BuildError)
    module, graph, loaded = restore(root, manifest, data[WEIGHTS_FILE], plugins, remedy, BuildError)
    try:
        report = BuildReport.from_json(json.loads(data[REPORT_FILE]))
    except (ValueError, KeyError, TypeError) as exc:
        raise BuildError(
            f"{root / REPORT_FILE} is not a build report ({type(exc).__name__}: {exc}): {remedy}"
        ) from None
    return BuildResult(module, report, graph, loaded, root)


def restore(
    root: Path,
    manifest: dict[str, Any],
    weights: bytes,
    plugins: Sequence[str],
    remedy: str,
    error: type[Exception],
) -> tuple[torch.nn.Module, nx.DiGraph, LoadedSpec]:
    """The module of a verified directory (a build or an exported artifact) whose plug-ins were checked
    (:func:`check_plugins`): ``spec.resolved.yaml`` loaded with ``plugins``, checked against the manifest's
    ``spec_sha256``, compiled, and given ``weights`` (safetensors bytes) strictly. Raises ``error`` naming the
    file that does not fit."""
    from titans_compose.graph import compile_graph

    loaded = _load(root / SPEC_FILE, (), plugins)
    if spec_hash(loaded) != manifest.get("spec_sha256"):
        raise error(
            f"{root / SPEC_FILE} no longer resolves to the spec that was built (its spec_sha256 in {MANIFEST} "
            f"differs): this titans-compose reads the spec differently; {remedy}"
        )
    graph, _ = compile_graph(loaded)
    module = seeded_module(graph, loaded, manifest["seed"])
    try:
        tensors = load_tensors(weights)
    except SafetensorError as exc:
        raise error(f"{root / WEIGHTS_FILE} is not a readable safetensors file ({exc}): {remedy}") from None
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise error(f"{root / WEIGHTS_FILE} does not fit the model of {SPEC_FILE}: {exc}") from None
    return module, graph, loaded
