"""``NeuralMemory``: the Titans long-term memory as an nn.Module built from one :class:`MemoryOp`.

x -> q, k, v (linear, activation, depthwise causal conv, l2 norm on q and k) -> per-head memory scan (the generated
Triton kernel, the chunked or the reference backend: ``choice`` says which ran and why) -> RMSNorm per head ->
output gate -> output projection. The inner gates are computed in log space from logits (theta = max_lr * sigmoid,
log eta = logsigmoid, log(1 - alpha) = logsigmoid(-z)), so extreme logits never produce inf or NaN; the forget
gate's bias starts at the configured half-life. The step's parametrisations (theta over the head dimension, the EMA
momentum form's factor 1 - eta) are transforms of theta before the scan, so every backend runs them.

Under context parallelism (a :class:`~titans_compose.nn.context.Spread` given to a call) the projections, gate
logits and readout run on the rank's tokens, and the convolution, gates and scan on every token of the rank's share
of the heads, between the two exchanges of :mod:`titans_compose.nn.context`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_compose.graph.blocks import memory_op
from titans_compose.nn.context import Spread, to_heads, to_sequence
from titans_compose.ops.memory import mlp as memory_mlp
from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.ops.memory.dispatch import BackendChoice, MemoryBackend
from titans_compose.ops.memory.finite import MemoryDivergedError, finite_flag, first_nonfinite_token
from titans_compose.ops.memory.op import MemoryOp
from titans_compose.ops.memory.state import MemoryState
from titans_compose.registry.core import Registry


@dataclass(frozen=True)
class NeuralMemoryState:
    """The memory state (per batch row and head), the causal convolutions' last inputs, and the per-chunk gates'
    log values for the memory's pending tokens (see :func:`inner_gates`)."""

    memory: MemoryState
    conv: dict[str, Tensor] | None
    gates: dict[str, Tensor] | None = None

    def detach(self) -> NeuralMemoryState:
        def cut(ts: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
            return None if ts is None else {k: t.detach() for k, t in ts.items()}

        return NeuralMemoryState(self.memory.detach(), cut(self.conv), cut(self.gates))


class _Gate(nn.Module):
    """One inner-loop gate per head: logits from a linear layer (per token / per chunk) or a learned constant."""

    def __init__(self, dim: int, heads: int, granularity: str, bias: float) -> None:
        super().__init__()
        self.granularity = granularity
        self.bias = nn.Parameter(torch.full((heads,), bias))
        self.proj = None
        if granularity != "constant":
            self.proj = nn.Linear(dim, heads, bias=False)
            nn.init.zeros_(self.proj.weight)  # every gate starts exactly at its configured initial value

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, T, H]."""
        if self.proj is None:
            return self.bias.expand(*x.shape[:-1], -1)
        return self.proj(x) + self.bias


def _chunk_log_mean(log_values: Tensor, chunk: int) -> Tensor:
    """log(mean over each chunk of exp(log_values)) broadcast back to the tokens; [B, T, H] starting at a chunk
    boundary. The last chunk may be partial: its mean is over the tokens present. Counts enter as Python floats,
    so the result keeps the input's dtype (an integer count's ``log()`` would be float32)."""
    length = log_values.shape[1]
    full = length - length % chunk
    parts = []
    if full:
        blocks = log_values[:, :full].unflatten(1, (full // chunk, chunk))
        means = blocks.logsumexp(2, keepdim=True) - math.log(chunk)
        parts.append(means.expand_as(blocks).flatten(1, 2))
    if length > full:
        tail = log_values[:, full:]
        parts.append((tail.logsumexp(1, keepdim=True) - math.log(length - full)).expand_as(tail))
    return torch.cat(parts, 1) if parts else log_values


#: each gate's log value from its logit (theta / max_lr = sigmoid(z), eta = sigmoid(z), 1 - alpha = sigmoid(-z)) and
#: the :class:`Pending` field holding its series
_GATE_LOGS: dict[str, tuple[Any, str]] = {
    "lr": (F.logsigmoid, "theta"),
    "momentum": (F.logsigmoid, "log_eta"),
    "forget": (lambda z: F.logsigmoid(-z), "log_keep"),
}


@dataclass(frozen=True)
class InnerGates:
    """The inner-loop gates of one call. ``theta``, ``log_eta``, ``log_keep``: [B*H, T] for the call's tokens (None
    where a gate is off). ``memory``: the memory state to continue, its pending tokens' per-chunk gates recomputed
    over every token of their chunk seen so far. ``carry``: per per-chunk gate, the log values [B, p, H] of the
    tokens left pending after the call, which the next call averages with its own (None when there are none)."""

    theta: Tensor
    log_eta: Tensor | None
    log_keep: Tensor | None
    memory: MemoryState
    carry: dict[str, Tensor] | None


def inner_gates(
    gates: dict[str, _Gate | None],
    max_lr: float,
    chunk: int,
    logits: dict[str, Tensor],
    memory: MemoryState,
    carried: dict[str, Tensor] | None,
    *,
    ema: bool = False,
) -> InnerGates:
    """The gates ``{"lr", "momentum", "forget"}`` (None: off) from their ``logits`` [B, T, H] (:meth:`_Gate.forward`
    of a call's input, one entry per gate that is on) continuing ``memory``; theta is ``max_lr * sigmoid(z)``, times
    ``1 - eta`` with ``ema`` (the EMA momentum form: the paper's recurrence with a transformed step, so every backend
    runs it unchanged).

    A per-chunk gate is the mean over its chunk, whose earlier tokens may have come in earlier calls: their log
    values travel in ``carried`` (the previous call's :attr:`InnerGates.carry`), so the chunk's mean, and with it the
    pending tokens' gates folded when the chunk completes, are those of one call over the whole stream. A chunk that
    the stream has not completed yet averages the tokens seen so far (one call ending there does the same). With
    ``ema`` and a per-chunk momentum gate, the pending tokens' theta depends on their chunk's mean eta, so the lr
    gate's log values travel too."""
    pend = memory.pending_len
    batch, length, _ = next(iter(logits.values())).shape
    left = (pend + length) % chunk
    momentum = gates.get("momentum")
    lr_follows_eta = ema and momentum is not None and momentum.granularity == "per_chunk"
    series: dict[str, Tensor | None] = {}
    pending: dict[str, Tensor] = {}
    carry: dict[str, Tensor] = {}

    def rows(t: Tensor) -> Tensor:  # [B, n, H] -> [B*H, n]
        return t.transpose(1, 2).reshape(batch * t.shape[2], t.shape[1])

    for name, gate in gates.items():
        if gate is None:
            series[name] = None
            continue
        log_fn, field = _GATE_LOGS[name]
        logs = log_fn(logits[name])
        per_chunk = gate.granularity == "per_chunk"
        if per_chunk or (name == "lr" and lr_follows_eta):
            if pend:
                if carried is None or name not in carried:
                    raise ValueError(
                        f"the state has {pend} pending tokens but not their {'per-chunk' if per_chunk else 'carried'} "
                        f"{name} gate values: continue a stream with the state this module returned"
                    )
                logs = torch.cat([carried[name], logs], 1)
            if left:
                carry[name] = logs[:, logs.shape[1] - left :]
            if per_chunk:
                logs = _chunk_log_mean(logs, chunk)
            if pend:
                pending[field] = rows(logs[:, :pend])
                logs = logs[:, pend:]
        series[name] = rows(logs)
    theta = max_lr * series["lr"].exp()
    if ema:
        theta = theta * -torch.expm1(series["momentum"])
    if "theta" in pending:
        pending["theta"] = max_lr * pending["theta"].exp()
        if ema:
            log_eta = pending.get("log_eta", memory.pending.log_eta)
            pending["theta"] = pending["theta"] * -torch.expm1(log_eta)
    if pending:
        memory = memory.with_pending_gates(**pending)
    return InnerGates(theta, series.get("momentum"), series.get("forget"), memory, carry or None)


def _depthwise_causal_conv(full: Tensor, weight: Tensor) -> Tensor:
    """``Conv1d(groups=channels)`` over time on [B, K-1+T, C] input (history first) with weight [C, K], as K
    shifted multiply-adds in the channel-last layout: no transposes, and cheaper than the grouped convolution's
    backward on the CPU."""
    kernel = weight.shape[1]
    length = full.shape[1] - kernel + 1
    out = full[:, :length] * weight[:, 0]
    for i in range(1, kernel):
        out = torch.addcmul(out, full[:, i : i + length], weight[:, i])
    return out


@dataclass(frozen=True)
class MemoryCall:
    """What one memory scan was given and gave: enough to check it and to find its first non-finite token again."""

    k: Tensor
    v: Tensor
    gates: InnerGates
    y: Tensor
    state: MemoryState
    config: MemoryConfig

    def finite(self) -> Tensor:
        """A 0-d bool tensor: whether the scan's output and state are finite (no host synchronisation)."""
        return finite_flag(self.y, self.state)

    def first_nonfinite(self) -> tuple[int | None, str]:
        """The call's first token whose inputs or memory weights are not finite, and which (see
        :func:`~titans_compose.ops.memory.finite.first_nonfinite_token`)."""
        g = self.gates
        return first_nonfinite_token(self.k, self.v, g.theta, g.log_eta, g.log_keep, g.memory, self.config)


class _MemoryReadout(nn.Module):
    """What every reader of a memory has, built from its :class:`MemoryOp`: the projections of ``roles`` (linear,
    activation, depthwise causal conv, l2 norm on q and k) and, added by :meth:`_add_readout`, the readout (RMSNorm
    per head, output gate, output projection)."""

    def __init__(self, op: MemoryOp, registry: Registry, roles: tuple[str, ...]) -> None:
        super().__init__()
        self.op = op
        self.config: MemoryConfig = op.config(registry)
        self.dim, self.heads, self.head_dim = op.in_features, op.heads, op.head_dim
        self.proj_activation = registry.get("activation", op.projections.activation).obj.fn
        for role in roles:
            setattr(self, f"{role}_proj", nn.Linear(op.in_features, op.width, bias=False))
        self.conv_kernel = op.projections.conv_kernel
        self.convs = nn.ModuleDict()
        if self.conv_kernel is not None:
            for role in roles:
                self.convs[role] = nn.Conv1d(op.width, op.width, self.conv_kernel, groups=op.width, bias=False)
        self.qk_l2norm = op.projections.qk_l2norm

    def _add_readout(self) -> None:
        op = self.op
        self.readout_norm = nn.Parameter(torch.ones(op.heads, op.head_dim)) if op.readout_norm else None
        self.eps = op.eps
        self.output_gate = op.output_gate
        self.gate_proj = nn.Linear(op.in_features, op.width, bias=False) if op.output_gate != "none" else None
        self.out_proj = nn.Linear(op.width, op.out_width, bias=False) if op.out_proj else None

    def share(self, spread: Spread | None) -> slice:
        """The heads a call computes: all of them, or, with ``spread`` (context parallelism), this rank's share."""
        return slice(0, self.heads) if spread is None else spread.context.heads(self.heads, "a memory")

    def _features(self, role: str, x: Tensor) -> Tensor:
        """The ``role`` projection of ``x`` [B, T, D] after its activation, per head: [B, T, H, d] (token-wise)."""
        h = self.proj_activation(getattr(self, f"{role}_proj")(x))
        return h.unflatten(-1, (self.heads, self.head_dim))

    def _mix(
        self, role: str, h: Tensor, heads: slice, conv_state: dict[str, Tensor] | None, new_conv: dict[str, Tensor]
    ) -> Tensor:
        """The ``role`` features [B, T, h, d] of ``heads`` -> [B*h, T, d]: the convolution over time, continuing
        from ``conv_state``, and the l2 norm of q and k."""
        b, n, share, d = h.shape
        h = h.flatten(2)
        if self.conv_kernel is not None:
            history = self.conv_kernel - 1
            prev = h.new_zeros(b, history, h.shape[2]) if conv_state is None else conv_state[role]
            full = torch.cat([prev, h], 1)
            new_conv[role] = full[:, full.shape[1] - history :]
            channels = slice(heads.start * d, heads.stop * d)
            h = _depthwise_causal_conv(full, self.convs[role].weight[channels, 0, :])
        h = h.reshape(b, n, share, d).transpose(1, 2).reshape(b * share, n, d)
        if self.qk_l2norm and role != "v":
            h = F.normalize(h, dim=-1, eps=1e-6)
        return h

    def _returned(self, y: Tensor, batch: int, heads: slice, spread: Spread | None) -> Tensor:
        """A call's retrieved values of ``heads``, [B*h, n, d] -> [B, n, h, d]; with ``spread``, sent back to the
        ranks holding the tokens: [B, n_rank, H, d]."""
        y = y.unflatten(0, (batch, heads.stop - heads.start)).transpose(1, 2)
        return y if spread is None else to_sequence(y, spread)

    def _readout(self, y: Tensor, x: Tensor) -> Tensor:
        """The retrieved values [B, T, H, d] of the queries of ``x`` [B, T, D] -> the layer's output [B, T, out]."""
        batch, length = x.shape[:2]
        if self.readout_norm is not None:
            y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps) * self.readout_norm
        y = y.reshape(batch, length, self.heads * self.head_dim)
        if self.gate_proj is not None:
            g = self.gate_proj(x)
            y = y * (torch.sigmoid(g) if self.output_gate == "sigmoid" else F.silu(g))
        if self.out_proj is not None:
            y = self.out_proj(y)
        return y


class NeuralMemory(_MemoryReadout):
    """The neural long-term memory of one block (memory-math.md sections 1-3), built from a :class:`MemoryOp`:
    ``NeuralMemory(op, registry)``, or ``NeuralMemory.from_block(block, model, registry)``, which lowers a validated
    block to its op. A model's memory layers are this module, built from the op on their graph node.

    ``forward(x, state=None, cu_seqlens=None) -> (out, state)``: ``x`` [B, T, in_features]. With ``cu_seqlens``
    (document boundaries of a packed batch of one row, like FlashAttention's), the memory and the convolutions
    restart at every boundary and the returned state is the last document's. An empty ``x`` (T = 0) gives an empty
    output and the state unchanged. With ``check_finite`` (the default) a call whose memory output or state is not
    finite raises :class:`~titans_compose.ops.memory.finite.MemoryDivergedError` naming the first such token (one
    reduction and one host synchronisation per call; switch it off for speed once a rule is known to be stable).

    The old form ``NeuralMemory(dim, memory, update, projections, registry, eps=...)`` (spec sections) still works,
    deprecated: it lowers the sections to an op.
    """

    def __init__(
        self,
        op: MemoryOp | int,
        *args: Any,
        eps: float | None = None,
        backend: str | None = None,
        check_finite: bool = True,
    ) -> None:
        if not isinstance(op, MemoryOp):
            if len(args) != 4:
                raise TypeError(
                    "NeuralMemory(op, registry) or, deprecated, (dim, memory, update, projections, registry)"
                )
            warnings.warn(
                "NeuralMemory(dim, memory, update, projections, registry) is deprecated: build it from a MemoryOp, "
                "NeuralMemory(op, registry), or from a validated block: NeuralMemory.from_block(block, model, "
                "registry)",
                DeprecationWarning,
                stacklevel=2,
            )
            memory, update, projections, registry = args
            op = MemoryOp.from_sections(op, memory, update, projections, registry, eps=1e-6 if eps is None else eps)
        elif len(args) != 1 or eps is not None:
            raise TypeError("NeuralMemory(op, registry): the op carries eps and every other setting")
        else:
            (registry,) = args
        super().__init__(op, registry, ("q", "k", "v"))
        self.check_finite = check_finite
        self.dispatch = MemoryBackend(op.backend if backend is None else backend)
        self.max_lr = op.lr.max_lr
        self.lr_factor = op.lr.factor(op.head_dim)
        self.lr_gate = _Gate(op.in_features, op.heads, op.lr.granularity, op.lr.bias)
        momentum, forget = op.momentum, op.forget
        self.momentum_gate = (
            _Gate(op.in_features, op.heads, momentum.granularity, momentum.bias) if momentum.enabled else None
        )
        self.forget_gate = _Gate(op.in_features, op.heads, forget.granularity, forget.bias) if forget.enabled else None
        self.init_weights = nn.ParameterList()
        for out_f, in_f in op.layer_shapes:
            w = torch.randn(op.heads, out_f, in_f) / math.sqrt(in_f)
            if op.init == "zero":
                w.zero_()
            self.init_weights.append(nn.Parameter(w, requires_grad=op.init == "learned"))
        self._add_readout()

    @classmethod
    def from_block(cls, block: Any, model: Any, registry: Registry, **kwargs: Any) -> NeuralMemory:
        """The memory of a validated spec block (any kind with memory, update and projections sections), built from
        the op lowering makes of it."""
        return cls(memory_op(block, model, registry), registry, **kwargs)

    # ------------------------------------------------------------------------------------------------ pieces

    @property
    def choice(self) -> BackendChoice:
        """The backend the last call ran and why (before the first call, what was asked for)."""
        return self.dispatch.choice

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, head_dim={self.head_dim}, layers={list(self.config.layer_shapes)}, "
            f"chunk={self.config.chunk_size}, retrieval={self.config.retrieval}, backend={self.choice.name}"
        )

    def initial_state(self, batch: int, heads: slice | None = None) -> NeuralMemoryState:
        """The state before any token: M_0 for every batch row, zero momentum, empty convolution history (of
        ``heads`` only, a context-parallel rank's share; default: all)."""
        weights = [w[heads or slice(None)] for w in self.init_weights]
        rows = [w.unsqueeze(0).expand(batch, *w.shape).reshape(batch * w.shape[0], *w.shape[1:]) for w in weights]
        return NeuralMemoryState(MemoryState.initial(rows, self.config.momentum), None)

    @property
    def _gates(self) -> dict[str, _Gate | None]:
        return {"lr": self.lr_gate, "momentum": self.momentum_gate, "forget": self.forget_gate}

    def _gate_logits(self, x: Tensor) -> dict[str, Tensor]:
        """Every gate's logits [B, T, H] for ``x`` [B, T, D] (the gates that are on)."""
        return {name: gate(x) for name, gate in self._gates.items() if gate is not None}

    def gates(self, x: Tensor, state: NeuralMemoryState | None = None) -> InnerGates:
        """theta, log eta, log(1 - alpha) [B*H, T] for the tokens of ``x`` continuing ``state`` (see
        :func:`inner_gates`)."""
        state = self.initial_state(x.shape[0]) if state is None else state
        return self._inner_gates(self._gate_logits(x), state)

    def _inner_gates(self, logits: dict[str, Tensor], state: NeuralMemoryState) -> InnerGates:
        """:func:`inner_gates` of the gate ``logits`` continuing ``state``, in the op's step form (max_lr scaled,
        EMA or paper momentum)."""
        return inner_gates(
            self._gates,
            self.max_lr * self.lr_factor,
            self.config.chunk_size,
            logits,
            state.memory,
            state.gates,
            ema=self.op.momentum.ema,
        )

    # ------------------------------------------------------------------------------------------------ forward

    def step(
        self, x: Tensor, state: NeuralMemoryState | None = None, spread: Spread | None = None
    ) -> tuple[Tensor, NeuralMemoryState, MemoryCall]:
        """One call without the finiteness check: (out, state, the scan's :class:`MemoryCall`) for ``x`` [B, T, D]
        continuing ``state``; a model checks the calls of all its layers at once. With ``spread`` (context
        parallelism: ``x`` holds this rank's tokens of the piece it describes), the projections, gate logits and
        readout run on this rank's tokens and the convolution, gates and scan on the whole piece for this rank's
        share of the heads, whose state ``state``, the returned state and the call hold."""
        batch = x.shape[0]
        heads = self.share(spread)
        state = self.initial_state(batch, heads) if state is None else state
        features = [self._features(role, x) for role in ("q", "k", "v")]
        logits = self._gate_logits(x)
        if spread is not None:
            moved = to_heads([*features, *(t.unsqueeze(-1) for t in logits.values())], spread)
            features = moved[:3]
            logits = {name: t.squeeze(-1) for name, t in zip(logits, moved[3:], strict=True)}
        new_conv: dict[str, Tensor] = {}
        q, k, v = (self._mix(role, h, heads, state.conv, new_conv) for role, h in zip("qkv", features, strict=True))
        gates = self._inner_gates(logits, state)
        y, memory_state = self.dispatch(q, k, v, gates.theta, gates.log_eta, gates.log_keep, gates.memory, self.config)
        call = MemoryCall(k, v, gates, y, memory_state, self.config)
        out = self._readout(self._returned(y, batch, heads, spread), x)
        return out, NeuralMemoryState(memory_state, new_conv or None, gates.carry), call

    def forward(
        self, x: Tensor, state: NeuralMemoryState | None = None, cu_seqlens: Tensor | list[int] | None = None
    ) -> tuple[Tensor, NeuralMemoryState]:
        if cu_seqlens is not None:
            return self._forward_documents(x, state, cu_seqlens)
        batch, length, _ = x.shape
        state = self.initial_state(batch) if state is None else state
        if length == 0:  # nothing to read or write
            return x.new_zeros(batch, 0, self.op.out_features), state
        out, state, call = self.step(x, state)
        if self.check_finite and not torch.compiler.is_compiling() and not call.finite():
            token, cause = call.first_nonfinite()
            raise MemoryDivergedError(type(self).__name__, token, "of this call", cause)
        return out, state

    def _forward_documents(
        self, x: Tensor, state: NeuralMemoryState | None, cu_seqlens: Tensor | list[int]
    ) -> tuple[Tensor, NeuralMemoryState]:
        bounds = [int(b) for b in cu_seqlens]
        if (
            x.shape[0] != 1
            or bounds[0] != 0
            or bounds[-1] != x.shape[1]
            or any(b1 < b0 for b0, b1 in itertools.pairwise(bounds))
        ):
            raise ValueError(
                f"cu_seqlens must rise from 0 to the sequence length {x.shape[1]} over a batch of one row, "
                f"got {bounds} for input {tuple(x.shape)}"
            )
        if state is not None:
            raise ValueError("cu_seqlens restarts the memory at every document: pass no state with it")
        outs, last = [], self.initial_state(1)
        for start, end in itertools.pairwise(bounds):
            if end > start:
                out, last = self(x[:, start:end])
                outs.append(out)
        if not outs:  # only empty documents
            return self(x)
        return torch.cat(outs, 1), last


class MemoryContextRead(_MemoryReadout):
    """A read of another memory's weights with its own query projection and readout, built from that memory's
    :class:`MemoryOp` (MAC's context read: the memory as it was when the segment began). The state it carries is
    its convolution's history."""

    def __init__(self, op: MemoryOp, registry: Registry) -> None:
        super().__init__(op, registry, ("q",))
        self._add_readout()

    def read(
        self,
        x: Tensor,
        weights: tuple[Tensor, ...],
        conv: dict[str, Tensor] | None,
        spread: Spread | None = None,
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """M(q) for the queries of ``x`` [B, T, D] read with ``weights`` ([B*H, out, in] per layer), and the
        convolution history after ``x``. With ``spread`` (context parallelism), ``weights`` and ``conv`` are this
        rank's share of the heads, which it reads for the whole piece (:meth:`NeuralMemory.step`)."""
        heads = self.share(spread)
        q = self._features("q", x)
        if spread is not None:
            (q,) = to_heads([q], spread)
        new_conv: dict[str, Tensor] = {}
        q = self._mix("q", q, heads, conv, new_conv)
        y = memory_mlp.forward(weights, q, self.config)
        return self._readout(self._returned(y, x.shape[0], heads, spread), x), new_conv or None
