"""Block kinds: which spec sections a block takes, how it lowers to graph nodes, and its wiring rules.

The wiring follows docs/memory-math.md section 5. Every block is pre-norm with residual adds, followed by the
block MLP (Llama-style). Node spec paths point at the section a node's settings come from, so a failing check
reports the line the user would edit.

The memory state node holds the state at the start of the current chunk (or MAC segment); a write takes it and
produces the updated states, and a recurrent edge carries the last one back. Reads take their state from the
write (retrieval after / before / per_chunk, memory-math.md sections 1.6 and 3.4) except MAC's context read, which
reads the pre-segment state straight from the state node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx

from titans_compose.graph.ir import GraphBuilder, inputs_of, origin
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


def _memory_width(ctx: LowerContext) -> int:
    return ctx.block.memory.heads * ctx.block.memory.head_dim


def _qkv(ctx: LowerContext, role: str, x: str, in_features: int) -> str:
    """q, k or v: linear + activation, optional depthwise causal conv, l2 norm on q and k."""
    proj = ctx.block.projections
    width = _memory_width(ctx)
    node = ctx.add(
        f"proj_{role}",
        "proj",
        "projections",
        {"x": x},
        role=role,
        in_features=in_features,
        out_features=width,
        activation=proj.activation,
    )
    if proj.conv_kernel is not None:
        node = ctx.add(f"conv_{role}", "conv", "projections", {"x": node}, kernel=proj.conv_kernel, features=width)
    if proj.qk_l2norm and not role.startswith("v"):
        node = ctx.add(
            f"l2norm_{role}",
            "norm",
            "projections",
            {"x": node},
            kind="l2",
            features=width,
            per_head=ctx.block.memory.heads,
        )
    return node


def _memory_params(ctx: LowerContext) -> dict[str, Any]:
    mem = ctx.block.memory
    model = ctx.registry.get("memory", mem.model).obj
    return dict(
        heads=mem.heads,
        head_dim=mem.head_dim,
        layers=model.layer_shapes(mem),
        momentum=ctx.block.update.momentum.enabled,
    )


def _memory_state(ctx: LowerContext) -> str:
    mem = ctx.block.memory
    return ctx.add("memory.state", "memory_state", "memory", model=mem.model, init=mem.init, **_memory_params(ctx))


def _memory_write(ctx: LowerContext, x: str, in_features: int, state: str) -> str:
    upd = ctx.block.update
    mem = ctx.block.memory
    gate_list = ["lr"] + (["momentum"] if upd.momentum.enabled else []) + (["forget"] if upd.forget.enabled else [])
    gates = ctx.add(
        "memory.gates",
        "memory_gates",
        "update",
        {"x": x},
        in_features=in_features,
        heads=mem.heads,
        gates=gate_list,
        lr=upd.lr.model_dump(),
        momentum=upd.momentum.model_dump(),
        forget=upd.forget.model_dump(),
    )
    keys = _qkv(ctx, "k", x, in_features)
    values = _qkv(ctx, "v", x, in_features)
    write = ctx.add(
        "memory.write",
        "memory_write",
        "memory",
        {"keys": keys, "values": values, "gates": gates, "state": state},
        chunk_size=mem.chunk_size,
        loss=upd.loss.model_dump(),
        grad_clip=upd.grad_clip,
        activation=mem.activation,
        residual=mem.residual,
        output_norm=mem.output_norm,
        **_memory_params(ctx),
    )
    ctx.builder.connect(write, state, "state", recurrent=True)
    return write


def _memory_read(ctx: LowerContext, name: str, query_src: str, in_features: int, state: str, retrieval: str) -> str:
    """Read the memory with queries projected from ``query_src``, then the readout (norm, gate, projection)."""
    mem = ctx.block.memory
    width = _memory_width(ctx)
    queries = _qkv(ctx, f"q{name}", query_src, in_features)
    y = ctx.add(
        f"memory.read{name}",
        "memory_read",
        "memory",
        {"queries": queries, "state": state},
        retrieval=retrieval,
        activation=mem.activation,
        residual=mem.residual,
        output_norm=mem.output_norm,
        **_memory_params(ctx),
    )
    if mem.readout_norm:
        y = ctx.add(
            f"memory.readout_norm{name}",
            "norm",
            "memory",
            {"x": y},
            kind="rmsnorm",
            features=width,
            per_head=mem.heads,
            eps=ctx.block.norm.eps,
        )
    if mem.output_gate != "none":
        g = ctx.add(
            f"memory.gate_proj{name}",
            "proj",
            "memory",
            {"x": query_src},
            role="output_gate",
            in_features=in_features,
            out_features=width,
            activation="identity",
        )
        y = ctx.add(f"memory.output_gate{name}", "gate", "memory", {"value": y, "gate": g}, form=mem.output_gate)
    if mem.out_proj:
        y = ctx.add(
            f"memory.out_proj{name}",
            "proj",
            "memory",
            {"x": y},
            role="out",
            in_features=width,
            out_features=ctx.model.dim,
            activation="identity",
        )
    return y


_MEMORY_ADD_HINT = (
    "the memory branch is added to the residual stream: it must have model.dim features, so either keep "
    "memory.out_proj: true or make memory.heads * memory.head_dim equal model.dim"
)


# ------------------------------------------------------------------------------------------- lowerings


def lower_lmm(ctx: LowerContext, x: str) -> str:
    """LMM: the memory alone as the sequence mixer: x + W_o(norm(M(q)) * gate(x))."""
    dim = ctx.model.dim
    h = _norm(ctx, "norm_mix", x)
    state = _memory_state(ctx)
    write = _memory_write(ctx, h, dim, state)
    y = _memory_read(ctx, "", h, dim, write, ctx.block.memory.retrieval)
    out = ctx.add("add_mix", "add", "memory", {"a": x, "b": y}, hint=_MEMORY_ADD_HINT)
    return _mlp_sublayer(ctx, out)


def lower_mac(ctx: LowerContext, x: str) -> str:
    """MAC: per segment, h = M_{s-1}(q); y = attention over [persistent || h || segment]; write y;
    o = y * gate(M_s(y)).
    With ``mac.memory_norm`` the memory writes and reads norm(y) (the product still takes y itself)."""
    dim = ctx.model.dim
    h = _norm(ctx, "norm_mix", x)
    state = _memory_state(ctx)
    mem_tokens = _memory_read(ctx, "_ctx", h, dim, state, "segment_start")
    y = _attention(ctx, "attention", h, "mac", persistent=_persistent(ctx), memory=mem_tokens)
    memory_in = _norm(ctx, "norm_memory", y, section="mac") if ctx.block.mac.memory_norm else y
    write = _memory_write(ctx, memory_in, dim, state)
    m = _memory_read(ctx, "_out", memory_in, dim, write, ctx.block.memory.retrieval)
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
    dim = ctx.model.dim
    mag = ctx.block.mag
    h = _norm(ctx, "norm_mix", x)
    y = _attention(ctx, "attention", h, persistent=_persistent(ctx))
    state = _memory_state(ctx)
    write = _memory_write(ctx, h, dim, state)
    m = _memory_read(ctx, "", h, dim, write, ctx.block.memory.retrieval)
    if mag.norms:
        y = _norm(ctx, "mag_norm_attention", y, section="mag")
        m = _norm(ctx, "mag_norm_memory", m, section="memory", hint=_MEMORY_ADD_HINT)
    o = ctx.add("mag_gate", "gate", "mag", {"value": y, "gate": m}, form=mag.gate, hint=_MEMORY_ADD_HINT)
    out = ctx.add("add_mix", "add", "mag", {"a": x, "b": o})
    return _mlp_sublayer(ctx, out)


def lower_mal(ctx: LowerContext, x: str) -> str:
    """MAL: y = memory layer over [persistent || x]; o = SWA(y) without the prefix positions."""
    dim = ctx.model.dim
    h = _norm(ctx, "norm_mix", x)
    persistent = _persistent(ctx)
    seq = h
    if persistent is not None:
        seq = ctx.add("prepend_persistent", "concat", "persistent", {"prefix": persistent, "x": h})
    state = _memory_state(ctx)
    write = _memory_write(ctx, seq, dim, state)
    m = _memory_read(ctx, "", seq, dim, write, ctx.block.memory.retrieval)
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


def _state_source(graph: nx.DiGraph, read: str) -> str:
    return graph.nodes[inputs_of(graph, read).get("state", read)]["op"]


def _the_one(graph: nx.DiGraph, layer: dict, op: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The layer's single node of ``op``, or None and the problem to report."""
    found = _layer_nodes(graph, layer, op)
    if len(found) == 1:
        return found[0], []
    return None, [(layer["input"], f"a {layer['kind']} block needs exactly one {op}, found {len(found)}")]


def _queries_from_input(graph: nx.DiGraph, layer: dict) -> list[tuple[str, str]]:
    """Every memory read of the layer takes its queries from the block input."""
    return [
        (read, "the memory's queries must come from the block input")
        for read in _layer_nodes(graph, layer, "memory_read")
        if origin(graph, read, "queries") != layer["input"]
    ]


def _memory_checks(graph: nx.DiGraph, layer: dict, write_from: str, write_from_name: str) -> list[tuple[str, str]]:
    write, problems = _the_one(graph, layer, "memory_write")
    if write is None:
        return problems
    for port in ("keys", "values"):
        src = origin(graph, write, port)
        if src != write_from:
            problems.append((write, f"the memory's {port} must come from {write_from_name}, not from {src}"))
    return problems


def wiring_mac(graph: nx.DiGraph, layer: dict) -> list[tuple[str, str]]:
    """MAC: the context read uses the pre-segment state and feeds the attention's memory tokens; the write takes
    the attention output; the output reads the updated memory."""
    attn, problems = _the_one(graph, layer, "attention")
    if attn is None:
        return problems
    problems = _memory_checks(graph, layer, attn, "the attention output")
    ctx_read = origin(graph, attn, "memory")
    if ctx_read is None or graph.nodes[ctx_read]["op"] != "memory_read":
        problems.append((attn, "the attention's memory tokens must come from a memory read"))
    elif _state_source(graph, ctx_read) != "memory_state":
        problems.append((ctx_read, "the memory tokens must be read with the state before the segment"))
    if origin(graph, attn, "x") != layer["input"]:
        problems.append((attn, "the attention's segment tokens must come from the block input"))
    gate = [n for n in _layer_nodes(graph, layer, "gate") if origin(graph, n, "value") == attn]
    out_reads = [origin(graph, n, "gate") for n in gate]
    if not any(
        r is not None and graph.nodes[r]["op"] == "memory_read" and _state_source(graph, r) == "memory_write"
        for r in out_reads
    ):
        problems.append((attn, "the output must be y * M(y) with M the memory after this segment's write"))
    return problems


def wiring_mag(graph: nx.DiGraph, layer: dict) -> list[tuple[str, str]]:
    """MAG: attention and the memory branch both read the block input; a gate combines them."""
    attn, problems = _the_one(graph, layer, "attention")
    if attn is None:
        return problems
    problems = _memory_checks(graph, layer, layer["input"], "the block input") + _queries_from_input(graph, layer)
    if origin(graph, attn, "x") != layer["input"]:
        problems.append((attn, "the attention must read the block input"))
    return problems


def wiring_mal(graph: nx.DiGraph, layer: dict) -> list[tuple[str, str]]:
    """MAL: the memory layer reads the block input (after the persistent prefix); attention reads the memory."""
    attn, problems = _the_one(graph, layer, "attention")
    if attn is None:
        return problems
    write, problems = _the_one(graph, layer, "memory_write")
    if write is None:
        return problems
    src = origin(graph, write, "keys")
    if src is not None and graph.nodes[src]["op"] == "concat":
        src = origin(graph, src, "x")
    if src != layer["input"]:
        problems.append((write, "the memory layer must read the block input"))
    read = origin(graph, attn, "x")
    if read is None or graph.nodes[read]["op"] != "memory_read":
        problems.append((attn, "the attention must read the memory layer's output"))
    return problems


def wiring_lmm(graph: nx.DiGraph, layer: dict) -> list[tuple[str, str]]:
    """LMM: the memory writes and reads the block input."""
    return _memory_checks(graph, layer, layer["input"], "the block input") + _queries_from_input(graph, layer)


def wiring_attention(graph: nx.DiGraph, layer: dict) -> list[tuple[str, str]]:
    """Attention-only baseline: no long-term memory."""
    return [
        (n, "an attention block has no long-term memory")
        for n in _layer_nodes(graph, layer, "memory_write") + _layer_nodes(graph, layer, "memory_read")
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
