"""Block kinds: which spec sections a block takes, how it lowers to graph nodes, and its wiring rules.

The wiring follows docs/memory-math.md section 5. Every block is pre-norm with residual adds, followed by the
block MLP (Llama-style). Node spec paths point at the section a node's settings come from, so a failing check
reports the line the user would edit.

A memory layer is one ``memory`` node carrying its :class:`~titans_compose.ops.memory.op.MemoryOp`: it projects
its input to queries, keys and values, writes the keys and values and reads the queries (retrieval after / before /
per_chunk, memory-math.md sections 1.6 and 3.4) in one call, and keeps its state from call to call. MAC's context
read is a ``memory_read`` node built from the same op, fed the memory's state (the one before the segment) by a
recurrent edge from the ``memory`` node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx

from titans_compose.graph.ir import GraphBuilder, origin
from titans_compose.ops.memory.op import MemoryOp
from titans_compose.registry.core import Registry

WiringCheck = Callable[[nx.DiGraph, dict], list[tuple[str, str]]]


@dataclass
class LowerContext:
    """What a block's lowering needs: the builder, the validated block and model sections, the block's spec path."""

    builder: GraphBuilder
    block: Any
    model: Any
    path: str
    registry: Registry

    def add(self, name: str, op: str, section: str, inputs: dict[str, str] | None = None, **kw: Any) -> str:
        return self.builder.add(name, op, f"{self.path}.{section}" if section else self.path, inputs, **kw)


@dataclass(frozen=True)
class BlockKind:
    """A registered block kind. ``lower(ctx, x) -> output node``; ``wiring(graph, layer)`` returns
    ``(node, message)`` for every wiring rule the layer breaks."""

    sections: tuple[str, ...]
    lower: Callable[[LowerContext, str], str]
    wiring: WiringCheck | None = None


# ------------------------------------------------------------------------------------------ shared pieces


def _norm(ctx: LowerContext, name: str, x: str, section: str = "norm", hint: str = "") -> str:
    """The block's pre-norm kind (RMSNorm / LayerNorm) over the model width; settings from ``section``."""
    norm = ctx.block.norm
    return ctx.add(name, "norm", section, {"x": x}, hint=hint, kind=norm.kind, eps=norm.eps, features=ctx.model.dim)


def _mlp_sublayer(ctx: LowerContext, x: str) -> str:
    mlp = ctx.block.mlp
    if mlp.kind == "none":
        return x
    h = _norm(ctx, "norm_mlp", x)
    dim = ctx.model.dim
    hidden = round(mlp.expansion * dim)
    if mlp.kind == "swiglu":
        hidden = -(-round(2 * hidden / 3) // 8) * 8
    m = ctx.add("mlp", "mlp", "mlp", {"x": h}, kind=mlp.kind, features=dim, hidden=hidden)
    return ctx.add("add_mlp", "add", "mlp", {"a": x, "b": m})


def _persistent(ctx: LowerContext) -> str | None:
    n = ctx.block.persistent.tokens
    if n == 0:
        return None
    return ctx.add("persistent", "persistent", "persistent", tokens=n, dim=ctx.model.dim)


def _attention(ctx: LowerContext, name: str, x: str, section: str = "attention", **inputs: str | None) -> str:
    att = ctx.block.attention
    dim = ctx.model.dim
    head_dim = att.head_dim or dim // att.heads
    params: dict[str, Any] = dict(
        kind=att.kind,
        heads=att.heads,
        head_dim=head_dim,
        dim=dim,
        window=att.window,
        rope=att.rope,
        rope_theta=att.rope_theta,
    )
    if section == "mac":
        mac = ctx.block.mac
        params.update(
            kind="segment",
            segment=mac.segment,
            order=list(mac.order),
            causal_memory_tokens=mac.causal_memory_tokens,
        )
    ports = {"x": x, **{k: v for k, v in inputs.items() if v is not None}}
    return ctx.add(
        name,
        "attention",
        section,
        ports,
        hint="attention runs at the model width: its inputs must have model.dim features",
        **params,
    )


def memory_op(block: Any, model: Any, registry: Registry) -> MemoryOp:
    """The memory op of a validated ``block`` (its memory, update and projections sections; its norm's eps) over
    inputs of the model width."""
    return MemoryOp.from_sections(
        model.dim, block.memory, block.update, block.projections, registry, out_width=model.dim, eps=block.norm.eps
    )


def _memory(ctx: LowerContext, x: str, context_read: str | None = None) -> str:
    """The layer's memory: writes the tokens of ``x`` and reads them back (queries from ``x`` too), one op call;
    ``context_read`` (MAC) reads the memory's state as it was before, through a recurrent edge."""
    op = memory_op(ctx.block, ctx.model, ctx.registry)
    node = ctx.add("memory", "memory", "memory", {"x": x}, memory=op)
    if context_read is not None:
        ctx.builder.connect(node, context_read, "state", recurrent=True)
    return node


def _memory_context_read(ctx: LowerContext, x: str) -> str:
    """MAC's read of the memory as it was when the segment began, with its own query projection and readout. It is
    built from the op of the memory whose state it reads (the recurrent edge :func:`_memory` adds), so it carries
    only its widths, for shape inference."""
    op = memory_op(ctx.block, ctx.model, ctx.registry)
    features = dict(in_features=op.in_features, out_features=op.out_features)
    return ctx.add("memory.read_ctx", "memory_read", "memory", {"queries": x}, retrieval="segment_start", **features)


_MEMORY_ADD_HINT = (
    "the memory branch is added to the residual stream: it must have model.dim features, so either keep "
    "memory.out_proj: true or make memory.heads * memory.head_dim equal model.dim"
)


# ------------------------------------------------------------------------------------------- lowerings


def lower_lmm(ctx: LowerContext, x: str) -> str:
    """LMM: the memory alone as the sequence mixer: x + W_o(norm(M(q)) * gate(x))."""
    h = _norm(ctx, "norm_mix", x)
    y = _memory(ctx, h)
    out = ctx.add("add_mix", "add", "memory", {"a": x, "b": y}, hint=_MEMORY_ADD_HINT)
    return _mlp_sublayer(ctx, out)


def lower_mac(ctx: LowerContext, x: str) -> str:
    """MAC: per segment, h = M_{s-1}(q); y = attention over [persistent || h || segment]; write y;
    o = y * gate(M_s(y)).
    With ``mac.memory_norm`` the memory writes and reads norm(y) (the product still takes y itself)."""
    h = _norm(ctx, "norm_mix", x)
    mem_tokens = _memory_context_read(ctx, h)
    y = _attention(ctx, "attention", h, "mac", persistent=_persistent(ctx), memory=mem_tokens)
    memory_in = _norm(ctx, "norm_memory", y, section="mac") if ctx.block.mac.memory_norm else y
    m = _memory(ctx, memory_in, context_read=mem_tokens)
    o = ctx.add(
        "mac_gate",
        "gate",
        "mac",
        {"value": y, "gate": m},
        form=ctx.block.mac.gate,
        hint="o = y * gate(M(y)): the memory read must have the attention output's shape",
    )
    out = ctx.add("add_mix", "add", "mac", {"a": x, "b": o})
    return _mlp_sublayer(ctx, out)


def lower_mag(ctx: LowerContext, x: str) -> str:
    """MAG: y = SWA over [persistent || x]; m = memory over x; o = norm_a(y) * gate(norm_b(m))."""
    mag = ctx.block.mag
    h = _norm(ctx, "norm_mix", x)
    y = _attention(ctx, "attention", h, persistent=_persistent(ctx))
    m = _memory(ctx, h)
    if mag.norms:
        y = _norm(ctx, "mag_norm_attention", y, section="mag")
        m = _norm(ctx, "mag_norm_memory", m, section="memory", hint=_MEMORY_ADD_HINT)
    o = ctx.add("mag_gate", "gate", "mag", {"value": y, "gate": m}, form=mag.gate, hint=_MEMORY_ADD_HINT)
    out = ctx.add("add_mix", "add", "mag", {"a": x, "b": o})
    return _mlp_sublayer(ctx, out)


def lower_mal(ctx: LowerContext, x: str) -> str:
    """MAL: y = memory layer over [persistent || x]; o = SWA(y) without the prefix positions."""
    h = _norm(ctx, "norm_mix", x)
    persistent = _persistent(ctx)
    seq = h
    if persistent is not None:
        seq = ctx.add("prepend_persistent", "concat", "persistent", {"prefix": persistent, "x": h})
    m = _memory(ctx, seq)
    y = _attention(ctx, "attention", m)
    if persistent is not None:
        y = ctx.add("drop_persistent", "slice", "persistent", {"x": y}, drop_prefix=ctx.block.persistent.tokens)
    out = ctx.add("add_mix", "add", "memory", {"a": x, "b": y}, hint=_MEMORY_ADD_HINT)
    return _mlp_sublayer(ctx, out)


def lower_attention(ctx: LowerContext, x: str) -> str:
    """Sliding-window (or full) attention only: the baseline without long-term memory."""
    h = _norm(ctx, "norm_mix", x)
    y = _attention(ctx, "attention", h, persistent=_persistent(ctx))
    out = ctx.add("add_mix", "add", "attention", {"a": x, "b": y})
    return _mlp_sublayer(ctx, out)


# ------------------------------------------------------------------------------------------- wiring rules


def _layer_nodes(graph: nx.DiGraph, layer: dict, op: str) -> list[str]:
    return [n for n, d in graph.nodes(data=True) if d["layer"] == layer["index"] and d["op"] == op]


def _context_source(graph: nx.DiGraph, read: str) -> str | None:
    """The memory node whose state a ``memory_read`` reads (its recurrent ``state`` edge), or None."""
    sources = [u for u, _, d in graph.in_edges(read, data=True) if d.get("port") == "state" and d.get("recurrent")]
    return sources[0] if len(sources) == 1 and graph.nodes[sources[0]]["op"] == "memory" else None


def _the_one(graph: nx.DiGraph, layer: dict, op: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The layer's single node of ``op``, or None and the problem to report."""
    found = _layer_nodes(graph, layer, op)
    if len(found) == 1:
        return found[0], []
    return None, [(layer["input"], f"a {layer['kind']} block needs exactly one {op}, found {len(found)}")]


def _memory_checks(graph: nx.DiGraph, layer: dict, write_from: str, write_from_name: str) -> list[tuple[str, str]]:
    memory, problems = _the_one(graph, layer, "memory")
    if memory is None:
        return problems
    src = origin(graph, memory, "x")
    if src != write_from:
        problems.append(
            (memory, f"the memory's keys, values and queries must come from {write_from_name}, not from {src}")
        )
    return problems


def wiring_mac(graph: nx.DiGraph, layer: dict) -> list[tuple[str, str]]:
    """MAC: the context read uses the pre-segment state and feeds the attention's memory tokens; the memory writes
    the attention output and its read of the updated memory gates it."""
    attn, problems = _the_one(graph, layer, "attention")
    if attn is None:
        return problems
    problems = _memory_checks(graph, layer, attn, "the attention output")
    ctx_read = origin(graph, attn, "memory")
    if ctx_read is None or graph.nodes[ctx_read]["op"] != "memory_read":
        problems.append((attn, "the attention's memory tokens must come from a memory read"))
    elif _context_source(graph, ctx_read) is None:
        problems.append((ctx_read, "the memory tokens must be read with the state before the segment"))
    if origin(graph, attn, "x") != layer["input"]:
        problems.append((attn, "the attention's segment tokens must come from the block input"))
    gate = [n for n in _layer_nodes(graph, layer, "gate") if origin(graph, n, "value") == attn]
    out_reads = [origin(graph, n, "gate") for n in gate]
    if not any(r is not None and graph.nodes[r]["op"] == "memory" for r in out_reads):
        problems.append((attn, "the output must be y * M(y) with M the memory after this segment's write"))
    return problems


def wiring_mag(graph: nx.DiGraph, layer: dict) -> list[tuple[str, str]]:
    """MAG: attention and the memory branch both read the block input; a gate combines them."""
    attn, problems = _the_one(graph, layer, "attention")
    if attn is None:
        return problems
    problems = _memory_checks(graph, layer, layer["input"], "the block input")
    if origin(graph, attn, "x") != layer["input"]:
        problems.append((attn, "the attention must read the block input"))
    return problems


def wiring_mal(graph: nx.DiGraph, layer: dict) -> list[tuple[str, str]]:
    """MAL: the memory layer reads the block input (after the persistent prefix); attention reads the memory."""
    attn, problems = _the_one(graph, layer, "attention")
    if attn is None:
        return problems
    memory, problems = _the_one(graph, layer, "memory")
    if memory is None:
        return problems
    src = origin(graph, memory, "x")
    if src is not None and graph.nodes[src]["op"] == "concat":
        src = origin(graph, src, "x")
    if src != layer["input"]:
        problems.append((memory, "the memory layer must read the block input"))
    read = origin(graph, attn, "x")
    if read is None or graph.nodes[read]["op"] != "memory":
        problems.append((attn, "the attention must read the memory layer's output"))
    return problems


def wiring_lmm(graph: nx.DiGraph, layer: dict) -> list[tuple[str, str]]:
    """LMM: the memory writes and reads the block input."""
    return _memory_checks(graph, layer, layer["input"], "the block input")


def wiring_attention(graph: nx.DiGraph, layer: dict) -> list[tuple[str, str]]:
    """Attention-only baseline: no long-term memory."""
    return [
        (n, "an attention block has no long-term memory")
        for n in _layer_nodes(graph, layer, "memory") + _layer_nodes(graph, layer, "memory_read")
    ]


_MEMORY_SECTIONS = ("memory", "update", "projections")
_COMMON = ("mlp", "norm")

BLOCK_KINDS: dict[str, tuple[BlockKind, str]] = {
    "mac": (
        BlockKind((*_MEMORY_SECTIONS, "persistent", "attention", "mac", *_COMMON), lower_mac, wiring_mac),
        "Memory as Context: segment attention over [persistent || memory read || segment], then write",
    ),
    "mag": (
        BlockKind((*_MEMORY_SECTIONS, "persistent", "attention", "mag", *_COMMON), lower_mag, wiring_mag),
        "Memory as Gate: sliding-window attention gated with the memory branch",
    ),
    "mal": (
        BlockKind((*_MEMORY_SECTIONS, "persistent", "attention", *_COMMON), lower_mal, wiring_mal),
        "Memory as Layer: the memory over [persistent || x], then sliding-window attention",
    ),
    "lmm": (
        BlockKind((*_MEMORY_SECTIONS, *_COMMON), lower_lmm, wiring_lmm),
        "the long-term memory alone as the sequence mixer",
    ),
    "attention": (
        BlockKind(("persistent", "attention", *_COMMON), lower_attention, wiring_attention),
        "attention only (sliding window by default): the baseline without long-term memory",
    ),
}


def register_block_kinds(registry: Registry) -> None:
    """Add the built-in block kinds to ``registry``. The registry calls it by name (``BUILTIN_PROVIDERS`` in
    :mod:`titans_compose.registry.builtins`), so that the block kinds register themselves and the registry layer
    does not import the graph layer."""
    for name, (kind, doc) in BLOCK_KINDS.items():
        registry.register("block", name, kind, description=doc)
