"""``TitansLM``: a language model assembled node by node from the checked graph IR.

Every graph node becomes one module (:data:`NODE_MODULES` maps op -> class) built from the node's ``params``;
the modules run in the graph's topological order, wired by its edges, so changing the spec (and so the graph)
changes the model. Nodes that carry something from one call to the next (causal convolutions, the memory state,
attention caches, MAC's segment-start memory, MAL's persistent prefix) keep it in a :class:`ModelState`, keyed by
node id, so a stream processed in pieces of any sizes computes what one call computes.

MAC layers (those with a ``segment`` attention node) run segment by segment: the context read uses the memory as it
was at the segment start (memory-math.md section 5), so every call is cut at the segment boundaries and the layer's
nodes run once per piece, the memory state flowing from piece to piece.

Split over a context group (:meth:`TitansLM.split_sequence`), each rank runs the token-wise nodes on its piece of
the stream and the sequence mixers (memory, context read, attention) on the whole stream for its share of the
heads (:mod:`titans_compose.nn.context`); MAC's segments then run one after another over the whole stream, each
rank on its tokens of the segment.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import networkx as nx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_compose.graph.ir import SymDim, dag_view, inputs_of
from titans_compose.nn.attention import Attention
from titans_compose.nn.context import ContextGroup, Spread
from titans_compose.nn.legacy_keys import rename_legacy_keys
from titans_compose.nn.memory import MemoryCall, MemoryContextRead, NeuralMemory, _depthwise_causal_conv
from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.ops.memory.dispatch import MemoryBackend
from titans_compose.ops.memory.finite import MemoryDivergedError
from titans_compose.ops.memory.op import MemoryOp

if TYPE_CHECKING:
    from collections.abc import Callable

    from titans_compose.registry.core import Registry
    from titans_compose.spec.validate import LoadedSpec


def _detach(value: Any) -> Any:
    """``value`` cut from the autograd graph: tensors, states with ``detach()``, and tuples / lists / dicts of them."""
    if hasattr(value, "detach"):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class ModelState:
    """What a stream carries between calls: ``position`` (tokens seen, for RoPE and segment / chunk grids),
    ``batch`` rows, and ``nodes``: per node id (``L<layer>.<name>``) that node's state (memory weights, momentum and
    pending chunk tokens; convolution history; attention cache; MAC segment-start weights)."""

    position: int
    batch: int
    nodes: dict[str, Any]

    def detach(self) -> ModelState:
        """The same state cut from the autograd graph (truncated backpropagation through time)."""
        return ModelState(self.position, self.batch, _detach(self.nodes))


@dataclass
class LMOutput:
    """Logits [B, T, vocab] and the state after the last token (None from a context-parallel call)."""

    logits: Tensor
    state: ModelState | None


@dataclass(frozen=True)
class Step:
    """Where a piece of the stream starts: ``position`` (tokens before it), ``batch`` rows and, in a MAC layer, the
    position inside the segment. Under context parallelism, ``spread`` says how the piece lies over the ranks and
    ``position`` is where this rank's tokens of it start."""

    position: int
    batch: int
    segment_pos: int = 0
    spread: Spread | None = None


# --------------------------------------------------------------------------------------------- node modules


class Node(nn.Module):
    """One graph node. ``run(inputs, state, step) -> (output, new state)``; ``inputs`` maps port -> value."""

    stateful: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any], ctx: BuildContext) -> None:
        super().__init__()

    def run(self, inputs: dict[str, Any], state: Any, step: Step) -> tuple[Any, Any]:
        raise NotImplementedError


@dataclass
class BuildContext:
    """What building a node may need besides its params: the registry and shared modules. (Everything else comes
    from the node's params: the graph is the model's only description.)"""

    registry: Registry
    embedding: nn.Embedding | None


class Embed(Node):
    def __init__(self, params: dict[str, Any], ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        self.embedding = nn.Embedding(params["vocab_size"], params["dim"])
        nn.init.normal_(self.embedding.weight, std=0.02)

    def run(self, inputs: dict[str, Any], state: Any, step: Step) -> tuple[Tensor, Any]:
        return self.embedding(inputs["tokens"]), None


class Head(Node):
    """Logits; with ``tied`` the embedding matrix is the output matrix."""

    def __init__(self, params: dict[str, Any], ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        self.proj = None if params["tied"] else nn.Linear(params["dim"], params["vocab_size"], bias=False)
        self._tied = [ctx.embedding] if params["tied"] else []  # a list: not registered twice as a submodule

    @property
    def weight(self) -> Tensor:
        """The output matrix [vocab, dim]."""
        return self._tied[0].weight if self.proj is None else self.proj.weight

    def run(self, inputs: dict[str, Any], state: Any, step: Step) -> tuple[Tensor, Any]:
        return F.linear(inputs["x"], self.weight), None


class Persistent(Node):
    def __init__(self, params: dict[str, Any], ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        self.tokens = nn.Parameter(torch.randn(params["tokens"], params["dim"]))

    def run(self, inputs: dict[str, Any], state: Any, step: Step) -> tuple[Tensor, Any]:
        return self.tokens, None


class Concat(Node):
    """Prepend the prefix, only at the very start of the stream (MAL's persistent tokens). Under context
    parallelism a rank whose tokens come later prepends none of it, but through the prefix's autograd graph, so
    that every rank has a gradient for it (zero there), as DDP and FSDP2 need."""

    def run(self, inputs: dict[str, Any], state: Any, step: Step) -> tuple[Tensor, Any]:
        x, prefix = inputs["x"], inputs["prefix"]
        if step.position > 0 and step.spread is None:
            return x, None
        taken = prefix if step.position == 0 else prefix[:0]
        return torch.cat([taken.expand(x.shape[0], -1, -1), x], 1), None


class Slice(Node):
    """Drop the prefix positions, which only the stream's first piece has."""

    def __init__(self, params: dict[str, Any], ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        self.drop = params["drop_prefix"]

    def run(self, inputs: dict[str, Any], state: Any, step: Step) -> tuple[Tensor, Any]:
        return (inputs["x"] if step.position > 0 else inputs["x"][:, self.drop :]), None


class Norm(Node):
    """RMSNorm / LayerNorm over the features; with ``per_head``, l2 normalisation or RMSNorm with per-head gains."""

    def __init__(self, params: dict[str, Any], ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        self.kind, self.heads = params["kind"], params.get("per_head")
        self.eps = params.get("eps", 1e-6)
        features = params["features"]
        self.norm: nn.Module | None = None
        self.gain: nn.Parameter | None = None
        if self.kind == "l2" or self.heads is not None:
            if self.heads is None or self.kind not in ("l2", "rmsnorm"):
                raise ValueError(f"norm node: {self.kind} per head {self.heads} is not supported")
            if self.kind == "rmsnorm":
                self.gain = nn.Parameter(torch.ones(self.heads, features // self.heads))
        elif self.kind == "rmsnorm":
            self.norm = nn.RMSNorm(features, eps=self.eps)
        elif self.kind == "layernorm":
            self.norm = nn.LayerNorm(features, eps=self.eps)
        else:
            raise ValueError(f"norm node: unknown kind {self.kind!r}")

    def run(self, inputs: dict[str, Any], state: Any, step: Step) -> tuple[Tensor, Any]:
        x = inputs["x"]
        if self.norm is not None:
            return self.norm(x), None
        h = x.unflatten(-1, (self.heads, x.shape[-1] // self.heads))
        if self.gain is None:
            h = F.normalize(h, dim=-1, eps=1e-6)
        else:
            h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps) * self.gain
        return h.flatten(-2), None


class Proj(Node):
    def __init__(self, params: dict[str, Any], ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        self.linear = nn.Linear(params["in_features"], params["out_features"], bias=False)
        self.activation = ctx.registry.get("activation", params["activation"]).obj.fn

    def run(self, inputs: dict[str, Any], state: Any, step: Step) -> tuple[Tensor, Any]:
        return self.activation(self.linear(inputs["x"])), None


class Conv(Node):
    """Depthwise causal convolution over time; the state is the last ``kernel - 1`` inputs."""

    stateful = True

    def __init__(self, params: dict[str, Any], ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        features, self.kernel = params["features"], params["kernel"]
        self.conv = nn.Conv1d(features, features, self.kernel, groups=features, bias=False)

    def run(self, inputs: dict[str, Any], state: Tensor | None, step: Step) -> tuple[Tensor, Tensor]:
        x = inputs["x"]
        history = self.kernel - 1
        prev = x.new_zeros(x.shape[0], history, x.shape[2]) if state is None else state
        full = torch.cat([prev, x], 1)
        return _depthwise_causal_conv(full, self.conv.weight[:, 0, :]), full[:, full.shape[1] - history :]


class MemoryNode(NeuralMemory):
    """A memory layer of the graph: the :class:`~titans_compose.nn.memory.NeuralMemory` of the node's op, whose
    backend the graph's ``backend`` pass chose. Its state: the memory's (weights, momentum, pending chunk tokens,
    convolution history, per-chunk gate values). The model checks its calls' finiteness for all layers at once."""

    stateful = True

    def __init__(self, params: dict[str, Any], ctx: BuildContext) -> None:
        op: MemoryOp = params["memory"]
        super().__init__(op, ctx.registry, check_finite=False)
        self.dispatch = MemoryBackend(op.backend, params.get("backend_reason"))


class MemoryReadNode(MemoryContextRead):
    """MAC's context read: the memory as it was when the current segment began (port ``state``: the memory's state
    before this piece, given by the layer). Its state: the segment-start weights and its convolution's history."""

    stateful = True

    def __init__(self, params: dict[str, Any], ctx: BuildContext) -> None:
        super().__init__(params["memory"], ctx.registry)

    def run(self, inputs: dict[str, Any], state: Any, step: Step) -> tuple[Tensor, Any]:
        weights, conv = (None, None) if state is None else state
        if step.segment_pos == 0 or weights is None:
            memory = inputs["state"].memory
            if memory.pending is not None:
                raise ValueError("a segment must start on a memory chunk boundary (segment a multiple of chunk_size)")
            weights = memory.weights
        y, conv = self.read(inputs["queries"], weights, conv, step.spread)
        return y, (weights, conv)


class AttentionNode(Node):
    """The attention of a block (nn/attention.py). Its state: the KV cache (sliding window / full), or the current
    segment's tokens and memory tokens so far (MAC)."""

    stateful = True

    def __init__(self, params: dict[str, Any], ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        self.attention = Attention(
            params["dim"],
            params["heads"],
            params["head_dim"],
            params["kind"],
            window=params.get("window"),
            rope=params["rope"],
            rope_theta=params["rope_theta"],
            segment=params.get("segment"),
            order=params.get("order"),
            causal_memory_tokens=params.get("causal_memory_tokens", True),
            full_segment_positions=True,
        )

    def run(self, inputs: dict[str, Any], state: Any, step: Step) -> tuple[Tensor, Any]:
        x, persistent = inputs["x"], inputs.get("persistent")
        if self.attention.kind != "segment":
            return self.attention.forward_cached(x, persistent, state, step.spread)
        if step.spread is not None:  # whole segments, nothing carried
            return self.attention.forward_segment(x, persistent, inputs["memory"], None, step.spread), None
        past = None if step.segment_pos == 0 else state
        if past is not None and not self.attention.causal_memory:
            raise ValueError(
                "MAC with causal_memory_tokens: false lets a token see later memory tokens of its segment, so a "
                "stream cannot stop inside a segment: give whole segments, or turn causal_memory_tokens on"
            )
        y = self.attention.forward_segment(x, persistent, inputs["memory"], past)
        if step.segment_pos + x.shape[1] == self.attention.segment:
            return y, None  # the segment is complete: the next one starts afresh
        if past is None:
            return y, (x, inputs["memory"])
        return y, (torch.cat([past[0], x], 1), torch.cat([past[1], inputs["memory"]], 1))


class Gate(Node):
    """value * form(gate): identity (MAC's y * M(y)), linear, sigmoid or silu."""

    FORMS: ClassVar[dict[str, Any]] = {"identity": None, "linear": None, "sigmoid": torch.sigmoid, "silu": F.silu}

    def __init__(self, params: dict[str, Any], ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        if params["form"] not in self.FORMS:
            raise ValueError(f"gate node: unknown form {params['form']!r}")
        self.fn = self.FORMS[params["form"]]

    def run(self, inputs: dict[str, Any], state: Any, step: Step) -> tuple[Tensor, Any]:
        g = inputs["gate"]
        return inputs["value"] * (g if self.fn is None else self.fn(g)), None


class MLP(Node):
    """SwiGLU: W2(silu(W1 x) * W3 x); GELU: W2(gelu(W1 x))."""

    def __init__(self, params: dict[str, Any], ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        dim, hidden, self.kind = params["features"], params["hidden"], params["kind"]
        self.up = nn.Linear(dim, hidden * (2 if self.kind == "swiglu" else 1), bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def run(self, inputs: dict[str, Any], state: Any, step: Step) -> tuple[Tensor, Any]:
        h = self.up(inputs["x"])
        if self.kind == "swiglu":
            a, b = h.chunk(2, -1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h)
        return self.down(h), None


class Add(Node):
    def run(self, inputs: dict[str, Any], state: Any, step: Step) -> tuple[Tensor, Any]:
        return inputs["a"] + inputs["b"], None


NODE_MODULES: dict[str, type[nn.Module]] = {
    "embed": Embed,
    "persistent": Persistent,
    "concat": Concat,
    "slice": Slice,
    "norm": Norm,
    "proj": Proj,
    "conv": Conv,
    "memory": MemoryNode,
    "memory_read": MemoryReadNode,
    "attention": AttentionNode,
    "gate": Gate,
    "mlp": MLP,
    "add": Add,
    "head": Head,
}
"""The module each graph op becomes (``input`` and ``output`` are the model's own argument and result)."""


def _key(node: str) -> str:
    """A node id as a module name (no dots)."""
    return node.replace(".", "__")


# --------------------------------------------------------------------------------------------- layers and model


#: graph ops that mix tokens and that context parallelism splits by heads (:mod:`titans_compose.nn.context`)
HEAD_PARALLEL_OPS = frozenset({"memory", "memory_read", "attention"})
#: graph ops that context parallelism runs as they are: token by token, or on the stream's first piece only
#: (``concat`` and ``slice``: MAL's persistent prefix, which the first rank holds)
CONTEXT_LOCAL_OPS = frozenset(
    {"input", "output", "embed", "head", "persistent", "norm", "proj", "gate", "mlp", "add", "concat", "slice"}
)


def _prefix_tokens(graph: nx.DiGraph, ports: dict[str, str]) -> int:
    """The tokens a node's sequence input (port ``x`` or ``queries``) carries before the stream's first token: the
    offset of its inferred length (``T+4``: MAL's 4 persistent tokens)."""
    source = ports.get("x", ports.get("queries"))
    length = graph.nodes[source]["shape"][1]
    return length.offset if isinstance(length, SymDim) else 0


def _memory_read_source(graph: nx.DiGraph, read: str) -> str:
    """The memory node whose state the ``memory_read`` node ``read`` reads (its recurrent ``state`` edge)."""
    sources = [u for u, _, d in graph.in_edges(read, data=True) if d.get("recurrent") and d.get("port") == "state"]
    if len(sources) != 1 or graph.nodes[sources[0]]["op"] != "memory":
        raise ValueError(f"{read}: a memory read must read one memory's state through a recurrent edge")
    return sources[0]


class _LayerProgram:
    """One layer's nodes in topological order with their input ports. A MAC layer (a ``segment`` attention) runs
    once per piece of the call that lies within one segment; its context read is given the state of the memory it
    reads (its recurrent ``state`` edge) as that memory's state before the piece."""

    def __init__(self, graph: nx.DiGraph, record: dict, order: list[str], modules: nn.ModuleDict) -> None:
        self.input, self.output, self.modules = record["input"], record["output"], modules
        nodes = [n for n in order if graph.nodes[n]["layer"] == record["index"]]
        self.program = [(n, inputs_of(graph, n)) for n in nodes]
        #: per sequence mixer, the tokens its input carries before the stream's first (MAL's persistent prefix)
        self.prefix = {
            node: _prefix_tokens(graph, ports)
            for node, ports in self.program
            if graph.nodes[node]["op"] in HEAD_PARALLEL_OPS
        }
        #: the context group the layer's pieces are split over (None: this process holds the whole stream)
        self.context: ContextGroup | None = None
        self.reads: dict[str, str] = {}  # context read -> the memory node whose state it reads
        self.segment: int | None = None
        for node, _ in self.program:
            op, params = graph.nodes[node]["op"], graph.nodes[node]["params"]
            if op == "attention" and params["kind"] == "segment":
                self.segment = params["segment"]
            elif op == "memory_read":
                self.reads[node] = _memory_read_source(graph, node)

    def node_modules(self) -> list[nn.Module]:
        """The modules of the layer's nodes, in program order (e.g. to shard the layer's parameters as a unit)."""
        return [self.modules[_key(node)] for node, _ in self.program]

    def run(self, x: Tensor, cur: dict[str, Any], position: int, checks: list[_Check] | None) -> Tensor:
        """The layer's output for ``x`` [B, T, D] starting ``position`` tokens into the stream; updates ``cur`` and
        appends each memory call's finiteness check to ``checks`` (None: no checks). Under context parallelism
        (:attr:`context`), ``x`` is this rank's piece of a stream from its start (:meth:`_run_spread`)."""
        if self.context is not None:
            return self._run_spread(x, cur, checks)
        if self.segment is None:
            return self._piece(x, cur, Step(position, x.shape[0]), checks)
        outs, start = [], 0
        while start < x.shape[1]:
            pos = position + start
            seg_pos = pos % self.segment
            n = min(self.segment - seg_pos, x.shape[1] - start)
            outs.append(self._piece(x[:, start : start + n], cur, Step(pos, x.shape[0], seg_pos), checks))
            start += n
        return torch.cat(outs, 1)

    def _run_spread(self, x: Tensor, cur: dict[str, Any], checks: list[_Check] | None) -> Tensor:
        """:meth:`run` under context parallelism: ``x`` [B, T / size, D] is this rank's contiguous piece of a
        stream of T tokens from its start. The layer runs piece by piece over the whole stream (one piece, or a
        MAC layer's segments, which may straddle ranks), each rank on its own tokens of the piece (possibly none)
        and each sequence mixer on the whole piece for its share of the heads."""
        context, mine = self.context, x.shape[1]
        total, first = mine * context.size, mine * context.rank
        size = self.segment or total
        outs = []
        for start in range(0, total, size):
            stop = min(start + size, total)
            lengths = tuple(max(0, min(stop, (i + 1) * mine) - max(start, i * mine)) for i in range(context.size))
            begin = max(start, first)
            local = x[:, begin - first : begin - first + lengths[context.rank]]
            step = Step(begin, x.shape[0], 0, Spread(context, lengths, start))
            outs.append(self._piece(local, cur, step, checks))
        return torch.cat(outs, 1)

    def _piece(self, x: Tensor, cur: dict[str, Any], step: Step, checks: list[_Check] | None) -> Tensor:
        env: dict[str, Any] = {self.input: x}
        for node, ports in self.program:
            module = self.modules[_key(node)]
            inputs = {port: env[src] for port, src in ports.items()}
            spread = None if step.spread is None else step.spread.with_prefix(self.prefix.get(node, 0))
            if isinstance(module, MemoryNode):
                out, cur[node], call = module.step(inputs["x"], cur.get(node), spread)
                if checks is not None:  # the memory sees x after any prefix (MAL's persistent tokens)
                    if spread is None:
                        first = step.position - (inputs["x"].shape[1] - x.shape[1])
                    else:
                        first = spread.start - (sum(spread.lengths) - sum(step.spread.lengths))
                    checks.append(_Check(node, call, first, call.finite()))
                env[node] = out
                continue
            if node in self.reads:
                memory = self.modules[_key(self.reads[node])]
                state = cur.get(self.reads[node])
                inputs["state"] = memory.initial_state(step.batch, memory.share(spread)) if state is None else state
            node_step = step if spread is step.spread else replace(step, spread=spread)
            out, new = module.run(inputs, cur.get(node), node_step)
            env[node] = out
            if module.stateful:
                cur[node] = new
        return env[self.output]


@dataclass(frozen=True)
class _Check:
    """One memory call of a forward pass: its node, the call, the stream position of its first memory token and
    whether its output and state are finite (a 0-d tensor, read once per forward with the others)."""

    node: str
    call: MemoryCall
    first: int
    finite: Tensor

    def error(self) -> MemoryDivergedError:
        """The error for this call, naming its first token whose memory weights are not finite."""
        token, cause = self.call.first_nonfinite()
        if token is not None and self.first + token < 0:  # MAL: one of the persistent tokens written first
            return MemoryDivergedError(self.node, token, "of the memory's input (a persistent token)", cause)
        return MemoryDivergedError(self.node, None if token is None else self.first + token, "of the stream", cause)


def _earliest(checks: list[_Check], finite: Tensor) -> MemoryDivergedError:
    """The error for the earliest failing memory call of a forward (``finite``: each call's flag, over every
    context-parallel rank's heads): a layer fed by a diverged one fails too, later in the stream. A rank whose own
    heads of a failing call are finite names the call without a token."""
    errors = [
        c.error() if not c.finite else MemoryDivergedError(c.node, None, "", "another rank's heads are not finite")
        for c, ok in zip(checks, finite.tolist(), strict=True)
        if not ok
    ]
    return min(errors, key=lambda e: (e.token is None, e.where == "of the stream", e.token or 0))


def _component(node: str, data: dict) -> str:
    """The part of the model a node's parameters count towards (see :meth:`TitansLM.components`)."""
    op, layer = data["op"], data["layer"]
    if layer is None:
        return {"embed": "embedding", "head": "head"}.get(op, "final_norm")
    name = node.split(".", 1)[1]
    if op in ("attention", "persistent"):
        part = "attention"
    elif op == "mlp" or name == "norm_mlp":
        part = "mlp"
    elif op.startswith("memory") or op in ("proj", "conv") or name.startswith(("memory.", "l2norm_")):
        part = "memory"
    else:
        part = "norms"
    return f"layer{layer}.{part}"


class TitansLM(nn.Module):
    """The language model of a checked graph: one module per node (``self.nodes``, keyed by node id with ``.`` as
    ``__``), run in topological order. ``forward(tokens, state=None, cu_seqlens=None) -> LMOutput``.

    With ``check_finite`` (the default) every forward folds each memory layer's output and state into one finiteness
    flag, read once at the end (one host synchronisation per forward); if one is not finite it raises
    :class:`~titans_compose.ops.memory.finite.MemoryDivergedError` naming the first such layer and the first token of
    the stream whose memory weights are not finite (found by running that layer's write again). Set it to False to
    skip the check; it is skipped under torch.compile / torch.export."""

    def __init__(self, graph: nx.DiGraph, loaded: LoadedSpec) -> None:
        super().__init__()
        dag = dag_view(graph)
        order = list(nx.lexicographical_topological_sort(dag, key=str))
        records = graph.graph["layers"]
        self.nodes = nn.ModuleDict()
        self._graph_info = {n: graph.nodes[n] for n in order}
        embedding = None
        for node in order:
            data = graph.nodes[node]
            if data["op"] in ("input", "output"):
                continue
            params = dict(data["params"])
            if data["op"] == "memory":
                params["backend_reason"] = data.get("backend_reason")
            elif data["op"] == "memory_read":  # built from the op of the memory it reads
                params["memory"] = graph.nodes[_memory_read_source(graph, node)]["params"]["memory"]
            module = NODE_MODULES[data["op"]](params, BuildContext(loaded.registry, embedding))
            if isinstance(module, Embed):
                embedding = module.embedding
            self.nodes[_key(node)] = module
        self.vocab_size = loaded.spec.model.vocab_size
        self.check_finite = True
        self.layers = [_LayerProgram(graph, rec, order, self.nodes) for rec in records]
        #: set by training to run each layer another way with ``program.run``'s signature (activation checkpointing)
        self.layer_runners: list[Callable[..., Tensor]] | None = None
        #: the context group each call's sequence is split over (:meth:`split_sequence`); None: not split
        self.context: ContextGroup | None = None

        def unit(n: str) -> Any:
            layer = graph.nodes[n]["layer"]
            return n if layer is None else ("layer", layer)

        units = nx.DiGraph()
        units.add_nodes_from(unit(n) for n in order)
        units.add_edges_from((unit(a), unit(b)) for a, b in dag.edges if unit(a) != unit(b))
        self.plan = list(nx.lexicographical_topological_sort(units, key=str))
        self.ports = {n: inputs_of(graph, n) for n in order}
        self.output = next(n for n in order if graph.nodes[n]["op"] == "output")
        self.register_load_state_dict_pre_hook(rename_legacy_keys)  # weights saved before one memory node per layer

    @classmethod
    def from_graph(cls, graph: nx.DiGraph, loaded: LoadedSpec) -> TitansLM:
        """The model of ``graph`` (from :func:`titans_compose.graph.compile_graph`) and its ``loaded`` spec."""
        return cls(graph, loaded)

    def initial_state(self, batch: int) -> ModelState:
        """The state before any token; every node starts from its initial value when it first runs."""
        return ModelState(0, batch, {})

    def context_parallel_problems(self, size: int) -> list[str]:
        """Why the model cannot split its sequences over ``size`` context-parallel ranks: a sequence mixer whose
        heads do not split evenly, or a node that mixes tokens without heads to split. Empty if it can."""
        problems = []
        for node, data in self._graph_info.items():
            op = data["op"]
            if op in HEAD_PARALLEL_OPS:
                module = self.nodes[_key(node)]
                heads = module.attention.heads if isinstance(module, AttentionNode) else module.heads
                if heads % size:
                    problems.append(f"{node} has {heads} heads, which do not split over {size} ranks")
            elif op not in CONTEXT_LOCAL_OPS:
                problems.append(f"{node} ({op}) mixes tokens and has no heads to split over the ranks")
        return problems

    def split_sequence(self, context: ContextGroup | None) -> None:
        """Split every call's sequence over the ranks of ``context`` (None: stop splitting). Each rank then calls
        the model with its contiguous 1/size of the same rows' tokens, from the stream's start, and gets the logits
        of its tokens; token-wise work runs on its tokens, and each sequence mixer on the whole sequence for its
        share of the heads (:mod:`titans_compose.nn.context`). The parameters must be the same on every rank; the
        gradients of each rank's call are its share, to be summed over the ranks. Raises ValueError naming what
        cannot be split (:meth:`context_parallel_problems`)."""
        if context is not None and (problems := self.context_parallel_problems(context.size)):
            raise ValueError(f"context parallelism over {context.size} ranks: {'; '.join(problems)}")
        self.context = context
        for program in self.layers:
            program.context = context

    def _check(self, tokens: Tensor, state: ModelState | None) -> None:
        if not isinstance(tokens, Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
            what = (
                f"{tokens.dtype} tensor of shape {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens)
            )
            raise ValueError(f"tokens must be a LongTensor [batch, length], got {what}")
        tracing = torch.compiler.is_compiling()  # torch.compile / torch.export: the ids' values are not known
        if tokens.numel() and not tracing and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got {int(tokens.min())}..{int(tokens.max())}"
            )
        if state is not None and state.batch != tokens.shape[0]:
            raise ValueError(f"the state is for a batch of {state.batch} rows, the tokens have {tokens.shape[0]}")

    def forward(
        self, tokens: Tensor, state: ModelState | None = None, cu_seqlens: Tensor | list[int] | None = None
    ) -> LMOutput:
        """Logits for ``tokens`` [B, T] continuing the stream of ``state`` (None: a new stream); T = 0 gives empty
        logits and the state unchanged. ``cu_seqlens`` (0 = b_0 < ... < b_n = T, a batch of one row, no ``state``):
        packed documents, each run as a stream of its own, so that no memory, convolution, attention or MAC segment
        crosses a boundary; the state returned is the last document's."""
        if self.context is not None and (state is not None or cu_seqlens is not None):
            raise ValueError(
                "a context-parallel model takes each rank's piece of whole streams from their start: no state, no "
                "cu_seqlens (call split_sequence(None) to continue a stream or pack documents)"
            )
        if cu_seqlens is not None:
            return self._forward_documents(tokens, state, cu_seqlens)
        self._check(tokens, state)
        if tokens.shape[1] == 0:  # no tokens: empty logits, and the stream stays where it was
            head = next(m for m in self.nodes.values() if isinstance(m, Head))
            logits = torch.zeros(*tokens.shape, self.vocab_size, dtype=head.weight.dtype, device=tokens.device)
            return LMOutput(logits, self.initial_state(tokens.shape[0]) if state is None else state)
        position = 0 if state is None else state.position
        cur: dict[str, Any] = {} if state is None else dict(state.nodes)
        checks: list[_Check] | None = None if torch.compiler.is_compiling() or not self.check_finite else []
        env: dict[str, Any] = {}
        step = Step(position, tokens.shape[0])
        for unit in self.plan:
            if isinstance(unit, tuple):
                program = self.layers[unit[1]]
                run = program.run if self.layer_runners is None else self.layer_runners[unit[1]]
                env[program.output] = run(env[program.input], cur, position, checks)
                continue
            op = self._graph_info[unit]["op"]
            if op == "input":
                env[unit] = tokens
            elif op == "output":
                env[unit] = env[self.ports[unit]["x"]]
            else:
                inputs = {port: env[src] for port, src in self.ports[unit].items()}
                env[unit] = self.nodes[_key(unit)].run(inputs, None, step)[0]
        if checks:
            finite = torch.stack([c.finite for c in checks])
            if self.context is not None:  # every rank raises, or none does (each checked its own heads)
                finite = self.context.all_finite(finite)
            if not finite.all():
                raise _earliest(checks, finite)
        if self.context is not None:  # each rank's nodes hold its own heads: no state to continue
            return LMOutput(env[self.output], None)
        return LMOutput(env[self.output], ModelState(position + tokens.shape[1], tokens.shape[0], cur))

    def _forward_documents(self, tokens: Tensor, state: ModelState | None, cu_seqlens: Tensor | list[int]) -> LMOutput:
        bounds = [int(b) for b in cu_seqlens]
        length = tokens.shape[1] if tokens.dim() == 2 else -1
        if tokens.dim() != 2 or tokens.shape[0] != 1 or not bounds or bounds[0] != 0 or bounds[-1] != length:
            raise ValueError(
                f"cu_seqlens must run from 0 to the sequence length over a batch of one row: got {bounds} for "
                f"tokens of shape {tuple(tokens.shape)}"
            )
        if any(b1 < b0 for b0, b1 in itertools.pairwise(bounds)):
            raise ValueError(f"cu_seqlens must not decrease, got {bounds}")
        if state is not None:
            raise ValueError("cu_seqlens starts every document from a fresh state: pass no state with it")
        outs = [self(tokens[:, a:b]) for a, b in itertools.pairwise(bounds) if b > a]
        if not outs:
            return self(tokens)
        return LMOutput(torch.cat([o.logits for o in outs], 1), outs[-1].state)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``prompt`` [B, T0] followed by ``max_new_tokens`` tokens, each from the cached state (no recomputation):
        greedy at ``temperature`` 0, else sampled from softmax(logits / temperature), restricted to the ``top_k``
        most likely tokens if given."""
        if max_new_tokens < 0 or not 0 <= temperature < math.inf or (top_k is not None and top_k < 1):
            raise ValueError(
                f"max_new_tokens and temperature must be finite and >= 0 and top_k >= 1 "
                f"(got {max_new_tokens}, {temperature}, {top_k})"
            )
        if self.context is not None:
            raise ValueError("generation continues a stream, which a context-parallel model does not carry")
        if prompt.dim() == 2 and prompt.shape[1] == 0 and max_new_tokens:
            raise ValueError("generate needs a prompt of at least one token: the first new token is predicted from it")
        out = self(prompt)
        tokens = [prompt]
        for i in range(max_new_tokens):
            logits = out.logits[:, -1]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits.float() / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            tokens.append(nxt)
            if i + 1 < max_new_tokens:
                out = self(nxt, out.state)
        return torch.cat(tokens, 1)

    def components(self) -> list[tuple[str, int]]:
        """(component, parameter count) in model order: embedding, per layer attention / memory / mlp / norms,
        final norm, head (0 when tied to the embedding)."""
        counts: dict[str, int] = {}
        for node, data in self._graph_info.items():
            if data["op"] in ("input", "output"):
                continue
            n = sum(p.numel() for p in self.nodes[_key(node)].parameters())
            if n or data["op"] == "head":
                name = _component(node, data)
                counts[name] = counts.get(name, 0) + n

        def rank(name: str) -> tuple[int, int]:
            first = {"embedding": -1, "final_norm": len(self.layers), "head": len(self.layers) + 1}
            return (first[name], 0) if name in first else (int(name[5 : name.index(".")]), 0)

        return sorted(counts.items(), key=lambda item: rank(item[0]))

    def memory_layers(self) -> list[tuple[str, NeuralMemory]]:
        """(node, module) for every memory layer, in model order: each is the NeuralMemory of its node's op."""
        found = ((n, self.nodes[_key(n)]) for n, d in self._graph_info.items() if d["op"] == "memory")
        return [(n, m) for n, m in found if isinstance(m, MemoryNode)]

    def memory_configs(self) -> list[MemoryConfig]:
        """The configuration every memory layer runs with: what the kernel generator keys its kernels on."""
        return [module.config for _, module in self.memory_layers()]

    def memory_backends(self) -> list[tuple[str, str, str]]:
        """(memory node, backend name, why) for every memory layer."""
        return [(n, module.choice.name, module.choice.reason) for n, module in self.memory_layers()]
