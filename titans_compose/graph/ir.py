"""The graph IR: a networkx DiGraph of typed operations.

Every node has ``op`` (one of :data:`OPS`), ``params`` (sizes and options it was lowered with), ``spec_path`` and
``loc`` (where in the spec it came from), ``layer`` (which layer, or None) and, after shape inference, ``shape``.
Edges carry the input ``port`` they feed and ``recurrent=True`` for a memory's state read by MAC's context read
(the state before the segment); every check that needs a DAG ignores recurrent edges.

Shapes are tuples of dimensions: ints, and :class:`SymDim` symbols such as ``B`` (batch), ``T`` (sequence) and
``T+4`` (a sequence with a 4-token prefix), which do their own arithmetic and print as written here.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx

from titans_compose.errors import Location


@dataclass(frozen=True)
class SymDim:
    """A symbolic dimension: ``name`` plus a non-negative ``offset`` of tokens (``T+4`` is ``SymDim("T", 4)``).

    Adding or subtracting an int moves the offset; an offset below zero is a :class:`ShapeError` (more tokens
    removed than the sequence was given). It prints, and compares equal to, its text (``"T+4"``), so shapes
    written as strings before it existed still compare equal.
    """

    name: str
    offset: int = 0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_]\w*", self.name):
            raise ValueError(f"a symbolic dimension's name must be an identifier, got {self.name!r}")
        if self.offset < 0:
            raise ShapeError(f"sequence dimension {self.name} is shorter than the {-self.offset} tokens removed")

    @classmethod
    def parse(cls, text: str) -> SymDim:
        """``"T+4"`` -> ``SymDim("T", 4)``."""
        m = re.fullmatch(r"([A-Za-z_]\w*)(?:\+(\d+))?", text)
        if m is None:
            raise ShapeError(f"{text!r} is not a symbolic dimension (NAME or NAME+N)")
        return cls(m.group(1), int(m.group(2) or 0))

    def __add__(self, delta: int) -> SymDim:
        if not isinstance(delta, int):
            return NotImplemented
        if self.offset + delta < 0:
            raise ShapeError(f"sequence dimension {self} is shorter than the {-delta} tokens removed")
        return SymDim(self.name, self.offset + delta)

    def __sub__(self, delta: int) -> SymDim:
        if not isinstance(delta, int):
            return NotImplemented
        return self + (-delta)

    def __str__(self) -> str:
        return f"{self.name}+{self.offset}" if self.offset else self.name

    def __repr__(self) -> str:
        return f"SymDim({self.name!r}, {self.offset})" if self.offset else f"SymDim({self.name!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SymDim):
            return (self.name, self.offset) == (other.name, other.offset)
        if isinstance(other, str):
            return str(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))  # equal to its text, so it hashes like it


#: the batch and sequence symbols of every model's shapes.
BATCH = SymDim("B")
SEQ = SymDim("T")

Dim = int | SymDim
Shape = tuple[Dim, ...]

OPS: dict[str, str] = {
    "input": "token ids [B, T]",
    "embed": "token embedding",
    "persistent": "learned persistent memory tokens [N_p, D]",
    "concat": "prepend a prefix along the sequence",
    "slice": "drop a prefix along the sequence",
    "norm": "RMSNorm / LayerNorm / l2 normalisation over the last axis (per head where given)",
    "proj": "linear projection with optional activation",
    "conv": "depthwise causal convolution over time",
    "memory": "a memory layer (its MemoryOp): q/k/v projections, inner gates, the chunked write of k, v and the "
    "read y = M(q) in one scan, readout; its state (weights M, momentum S) carried across calls",
    "memory_read": "MAC's context read y = M(q) of a memory's weights at the segment start (a recurrent edge)",
    "attention": "softmax attention (sliding window, full, or MAC segment)",
    "gate": "elementwise gating: value * form(gate)",
    "mlp": "block MLP (SwiGLU / GELU)",
    "add": "residual add",
    "head": "LM head to vocabulary logits",
    "output": "model output",
}

#: ops that only transform one input position by position (op -> that input's port): wiring checks look through
#: them to find where a tensor comes from. A gate passes its ``value`` through, scaled by its ``gate``.
TRANSPARENT_OPS: dict[str, str] = {"norm": "x", "proj": "x", "conv": "x", "slice": "x", "gate": "value"}

#: ops with no data input: learned parameters.
SOURCE_OPS = frozenset({"input", "persistent"})


class ShapeError(Exception):
    """Raised by a shape rule; the shape inference pass reports it at the node's spec location."""


def seq_offset(dim: Dim | str, delta: int) -> Dim:
    """Deprecated: write ``dim + delta`` (a :class:`SymDim` or an int). A string is parsed as before."""
    warnings.warn("seq_offset is deprecated: shapes hold SymDim, write dim + delta", DeprecationWarning, stacklevel=2)
    return (SymDim.parse(dim) if isinstance(dim, str) else dim) + delta


def fmt_shape(shape: Any) -> str:
    if isinstance(shape, dict):
        return ", ".join(f"{k}: {fmt_shape(v)}" for k, v in shape.items())
    return "[" + ", ".join(str(d) for d in shape) + "]"


class GraphBuilder:
    """Adds typed nodes with their spec location; used by the lowering of each block kind."""

    def __init__(self, locate: Callable[[str], Location | None]) -> None:
        self.graph = nx.DiGraph()
        self.graph.graph["layers"] = []
        self._locate = locate
        self.layer: int | None = None
        self.prefix = ""

    def add(
        self,
        name: str,
        op: str,
        spec_path: str,
        inputs: dict[str, str] | None = None,
        hint: str = "",
        **params: Any,
    ) -> str:
        """Add node ``name`` (prefixed by the current layer) fed by ``inputs`` (port -> node). Returns its id."""
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}")
        node = f"{self.prefix}{name}"
        if node in self.graph:
            raise ValueError(f"node {node!r} added twice")
        self.graph.add_node(
            node,
            op=op,
            params=params,
            spec_path=spec_path,
            loc=self._locate(spec_path),
            layer=self.layer,
            hint=hint,
            shape=None,
        )
        for port, src in (inputs or {}).items():
            self.connect(src, node, port)
        return node

    def connect(self, src: str, dst: str, port: str, recurrent: bool = False) -> None:
        if src not in self.graph:
            raise ValueError(f"edge from unknown node {src!r}")
        self.graph.add_edge(src, dst, port=port, recurrent=recurrent)


def inputs_of(graph: nx.DiGraph, node: str) -> dict[str, str]:
    """port -> source node of the non-recurrent inputs of ``node``."""
    return {data["port"]: src for src, _, data in graph.in_edges(node, data=True) if not data.get("recurrent", False)}


def origin(graph: nx.DiGraph, node: str, port: str) -> str | None:
    """Where the tensor feeding ``node``'s ``port`` comes from, looking through :data:`TRANSPARENT_OPS`."""
    src = inputs_of(graph, node).get(port)
    seen = set()
    while src is not None and graph.nodes[src]["op"] in TRANSPARENT_OPS and src not in seen:
        seen.add(src)
        src = inputs_of(graph, src).get(TRANSPARENT_OPS[graph.nodes[src]["op"]])
    return src


def dag_view(graph: nx.DiGraph) -> nx.DiGraph:
    """The graph without its recurrent edges."""
    return nx.subgraph_view(graph, filter_edge=lambda u, v: not graph.edges[u, v].get("recurrent", False))


# ---------------------------------------------------------------------------------------------- shape rules


def _need(inputs: dict[str, Any], *ports: str) -> list[Any]:
    missing = [p for p in ports if p not in inputs]
    if missing:
        raise ShapeError(f"missing input port(s) {', '.join(missing)}")
    return [inputs[p] for p in ports]


def _features(shape: Shape, want: int, what: str) -> None:
    if not shape or shape[-1] != want:
        raise ShapeError(f"{what} has shape {fmt_shape(shape)} but {want} features are expected")


def _same(a: Shape, b: Shape, what: str) -> Shape:
    if a != b:
        raise ShapeError(f"{what}: shapes {fmt_shape(a)} and {fmt_shape(b)} differ")
    return a


def _infer_input(p: dict, i: dict) -> Shape:
    return (BATCH, SEQ)


def _infer_embed(p: dict, i: dict) -> Shape:
    (tokens,) = _need(i, "tokens")
    if len(tokens) != 2:
        raise ShapeError(f"token ids must be [B, T], got {fmt_shape(tokens)}")
    return (*tokens, p["dim"])


def _infer_persistent(p: dict, i: dict) -> Shape:
    return (p["tokens"], p["dim"])


def _infer_concat(p: dict, i: dict) -> Shape:
    prefix, x = _need(i, "prefix", "x")
    if len(prefix) != 2 or len(x) != 3:
        raise ShapeError(f"concat needs a [N, D] prefix and a [B, T, D] input, got {fmt_shape(prefix)}, {fmt_shape(x)}")
    _features(x, prefix[-1], "the sequence")
    return (x[0], x[1] + prefix[0], x[2])


def _infer_slice(p: dict, i: dict) -> Shape:
    (x,) = _need(i, "x")
    return (x[0], x[1] - p["drop_prefix"], *x[2:])


def _infer_features_in_out(p: dict, i: dict) -> Shape:
    (x,) = _need(i, "x")
    _features(x, p["in_features"], "the input")
    return (*x[:-1], p["out_features"])


def _infer_same_features(p: dict, i: dict) -> Shape:
    (x,) = _need(i, "x")
    _features(x, p["features"], "the input")
    return x


def _infer_memory(p: dict, i: dict) -> Shape:
    (x,) = _need(i, "x")
    op = p["memory"]
    _features(x, op.in_features, "the memory's input")
    return (*x[:-1], op.out_features)


def _infer_memory_read(p: dict, i: dict) -> Shape:
    (queries,) = _need(i, "queries")
    _features(queries, p["in_features"], "the queries' source")
    return (*queries[:-1], p["out_features"])


def _infer_attention(p: dict, i: dict) -> Shape:
    (x,) = _need(i, "x")
    _features(x, p["dim"], "the attention input")
    if "persistent" in i:
        _features(i["persistent"], p["dim"], "the persistent tokens")
    if "memory" in i:
        _features(i["memory"], p["dim"], "the memory tokens")
        if i["memory"][:-1] != x[:-1]:
            raise ShapeError(f"memory tokens {fmt_shape(i['memory'])} and segment {fmt_shape(x)} differ in length")
    return x


def _infer_gate(p: dict, i: dict) -> Shape:
    value, gate = _need(i, "value", "gate")
    return _same(value, gate, "value and gate")


def _infer_add(p: dict, i: dict) -> Shape:
    a, b = _need(i, "a", "b")
    return _same(a, b, "residual add")


def _infer_head(p: dict, i: dict) -> Shape:
    (x,) = _need(i, "x")
    _features(x, p["dim"], "the final hidden state")
    return (*x[:-1], p["vocab_size"])


def _infer_output(p: dict, i: dict) -> Shape:
    (x,) = _need(i, "x")
    return x


SHAPE_RULES: dict[str, Callable[[dict, dict], Any]] = {
    "input": _infer_input,
    "embed": _infer_embed,
    "persistent": _infer_persistent,
    "concat": _infer_concat,
    "slice": _infer_slice,
    "norm": _infer_same_features,
    "proj": _infer_features_in_out,
    "conv": _infer_same_features,
    "memory": _infer_memory,
    "memory_read": _infer_memory_read,
    "attention": _infer_attention,
    "gate": _infer_gate,
    "mlp": _infer_same_features,
    "add": _infer_add,
    "head": _infer_head,
    "output": _infer_output,
}
