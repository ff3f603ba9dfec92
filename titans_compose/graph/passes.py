"""Named checks over the graph IR, run in dependency order by a small pass manager.

A pass takes the graph and returns diagnostics (and may annotate nodes, as shape inference does). A pass whose
requirement failed is skipped, so one root cause is reported once. Every diagnostic names its pass and the
spec location of the node it concerns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import networkx as nx

from titans_compose.errors import Diagnostic
from titans_compose.graph.ir import SHAPE_RULES, SOURCE_OPS, ShapeError, dag_view, fmt_shape, inputs_of
from titans_compose.registry.core import Registry


@dataclass(frozen=True)
class Pass:
    """A named graph check. ``requires`` names passes that must have succeeded first."""

    name: str
    run: Callable[[nx.DiGraph, Registry], list[Diagnostic]]
    requires: tuple[str, ...] = ()
    doc: str = ""


@dataclass
class PassReport:
    diagnostics: list[Diagnostic] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(d.severity == "error" for d in self.diagnostics)


def _at(graph: nx.DiGraph, node: str, code: str, message: str, hint: str = "") -> Diagnostic:
    data = graph.nodes[node]
    return Diagnostic(
        code,
        f"{node} ({data['op']}): {message}",
        data.get("spec_path", ""),
        data.get("loc"),
        hint or data.get("hint", ""),
    )


def check_acyclic(graph: nx.DiGraph, registry: Registry) -> list[Diagnostic]:
    """No cycle may run through non-recurrent edges (only the memory state's carry is recurrent)."""
    dag = dag_view(graph)
    if nx.is_directed_acyclic_graph(dag):  # linear time; find_cycle only runs to name a cycle that exists
        return []
    try:
        cycle = nx.find_cycle(dag)
    except nx.NetworkXNoCycle:
        return []
    path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
    return [
        _at(
            graph,
            cycle[0][0],
            "TC401",
            f"cycle through non-recurrent edges: {path}",
            "only a memory may feed its state back (to a context read), through an edge marked recurrent",
        )
    ]


def check_reachability(graph: nx.DiGraph, registry: Registry) -> list[Diagnostic]:
    """Every node is reachable from the input (learned sources exempt) and reaches the output."""
    inputs = [n for n, d in graph.nodes(data=True) if d["op"] == "input"]
    outputs = [n for n, d in graph.nodes(data=True) if d["op"] == "output"]
    if len(inputs) != 1 or len(outputs) != 1:
        return [Diagnostic("TC402", f"a model needs one input and one output, found {len(inputs)} and {len(outputs)}")]
    reached = nx.descendants(graph, inputs[0]) | {inputs[0]}
    reaching = nx.ancestors(graph, outputs[0]) | {outputs[0]}
    out = []
    for node, data in graph.nodes(data=True):
        if node not in reached and data["op"] not in SOURCE_OPS:
            out.append(_at(graph, node, "TC402", "not reachable from the model input"))
        if node not in reaching:
            out.append(
                _at(
                    graph,
                    node,
                    "TC402",
                    "its result never reaches the model output",
                    "a node whose output is unused is dead wiring",
                )
            )
    return out


def infer_shapes(graph: nx.DiGraph, registry: Registry) -> list[Diagnostic]:
    """Compute every node's output shape in topological order; report mismatches at the node's spec location."""
    out = []
    failed: set[str] = set()
    for node in nx.topological_sort(dag_view(graph)):
        data = graph.nodes[node]
        ins = inputs_of(graph, node)
        if any(src in failed for src in ins.values()):
            failed.add(node)
            continue
        shapes = {port: graph.nodes[src]["shape"] for port, src in ins.items()}
        try:
            data["shape"] = SHAPE_RULES[data["op"]](data["params"], shapes)
        except ShapeError as exc:
            failed.add(node)
            got = ", ".join(f"{p}={fmt_shape(s)}" for p, s in sorted(shapes.items()))
            out.append(_at(graph, node, "TC403", f"{exc} (inputs: {got})" if got else str(exc)))
        except (KeyError, TypeError) as exc:
            failed.add(node)
            out.append(_at(graph, node, "TC403", f"malformed node parameters: missing or bad {exc}"))
    return out


def check_wiring(graph: nx.DiGraph, registry: Registry) -> list[Diagnostic]:
    """Each layer is wired as its variant requires (memory-math.md section 5)."""
    out = []
    for layer in graph.graph.get("layers", []):
        kind = registry.get("block", layer["kind"]).obj
        if kind.wiring is None:
            continue
        for node, message in kind.wiring(graph, layer):
            out.append(
                _at(
                    graph,
                    node,
                    "TC404",
                    f"{layer['kind']} wiring: {message}",
                    f"see docs/memory-math.md section 5 for how a {layer['kind']} block is wired",
                )
            )
    return out


def select_backends(graph: nx.DiGraph, registry: Registry) -> list[Diagnostic]:
    """Record on every memory node which implementation was asked for, and why: a forced backend, or ``auto``
    (resolved per call from the tensors' device; each memory module then records what ran). The choice goes into
    the node's op (``backend``), from which the module is built."""
    from titans_compose.ops.memory.dispatch import BACKENDS, ENV_VAR, choose_backend

    try:
        choice = choose_backend()
    except ValueError as exc:
        return [
            Diagnostic("TC406", str(exc), hint=f"set {ENV_VAR} to one of {', '.join(sorted(BACKENDS))}, or unset it")
        ]
    for _, data in graph.nodes(data=True):
        if data["op"] == "memory":
            data["params"]["memory"] = replace(data["params"]["memory"], backend=choice.name)
            data["backend"], data["backend_reason"] = choice.name, choice.reason
    return []


DEFAULT_PASSES: tuple[Pass, ...] = (
    Pass("acyclic", check_acyclic, doc=check_acyclic.__doc__ or ""),
    Pass("reachability", check_reachability, doc=check_reachability.__doc__ or ""),
    Pass("shape_inference", infer_shapes, ("acyclic",), doc=infer_shapes.__doc__ or ""),
    Pass("wiring", check_wiring, ("acyclic",), doc=check_wiring.__doc__ or ""),
    Pass("backend", select_backends, ("shape_inference", "wiring"), doc=select_backends.__doc__ or ""),
)


class PassManager:
    """Runs passes in order; a pass whose requirements failed or were skipped is skipped too."""

    def __init__(self, passes: Sequence[Pass] = DEFAULT_PASSES, *, debug: bool = False) -> None:
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate pass names in {names}")
        for i, p in enumerate(passes):
            missing = [r for r in p.requires if r not in names[:i]]
            if missing:
                raise ValueError(f"pass {p.name!r} requires {missing}, which do not run before it")
        self.passes = tuple(passes)
        self.debug = debug

    def run(self, graph: nx.DiGraph, registry: Registry) -> PassReport:
        report = PassReport()
        failed: set[str] = set()
        for p in self.passes:
            if any(r in failed for r in p.requires):
                report.skipped.append(p.name)
                failed.add(p.name)
                continue
            try:
                found = p.run(graph, registry)
            except Exception as exc:  # a crashing pass is a bug to report, not a traceback to show
                if self.debug:
                    raise
                found = [
                    Diagnostic(
                        "TC405",
                        f"pass crashed: {type(exc).__name__}: {exc}",
                        hint="run with --debug for the traceback",
                    )
                ]
            found = [Diagnostic(d.code, d.message, d.path, d.location, d.hint, d.severity, p.name) for d in found]
            report.diagnostics.extend(found)
            report.ran.append(p.name)
            if any(d.severity == "error" for d in found):
                failed.add(p.name)
        return report
