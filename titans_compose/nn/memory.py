"""``NeuralMemory``: the Titans long-term memory as an nn.Module built from validated spec sections.

x -> q, k, v (linear, activation, depthwise causal conv, l2 norm on q and k) -> per-head memory scan (the generated
Triton kernel, the chunked or the reference backend: ``choice`` says which ran and why) -> RMSNorm per head ->
output gate -> output projection. The inner gates are computed in log space from logits (theta = max_lr * sigmoid,
log eta = logsigmoid, log(1 - alpha) = logsigmoid(-z)), so extreme logits never produce inf or NaN; the forget
gate's bias starts at the configured half-life.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_compose.ops.memory.config import MemoryConfig, memory_config
from titans_compose.ops.memory.dispatch import BackendChoice, MemoryBackend
from titans_compose.ops.memory.finite import MemoryDivergedError, finite_flag, first_nonfinite_token
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


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


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
    x: Tensor,
    memory: MemoryState,
    carried: dict[str, Tensor] | None,
) -> InnerGates:
    """The gates ``{"lr", "momentum", "forget"}`` (None: off) for ``x`` [B, T, D] continuing ``memory``.

    A per-chunk gate is the mean over its chunk, whose earlier tokens may have come in earlier calls: their log
    values travel in ``carried`` (the previous call's :attr:`InnerGates.carry`), so the chunk's mean, and with it the
    pending tokens' gates folded when the chunk completes, are those of one call over the whole stream. A chunk that
    the stream has not completed yet averages the tokens seen so far (one call ending there does the same)."""
    pend = memory.pending_len
    batch, length, _ = x.shape
    left = (pend + length) % chunk
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
        logs = log_fn(gate(x))
        if gate.granularity == "per_chunk":
            if pend:
                if carried is None or name not in carried:
                    raise ValueError(
                        f"the state has {pend} pending tokens but not their per-chunk {name} gate values: continue a "
                        "stream with the state this module returned"
                    )
                logs = torch.cat([carried[name], logs], 1)
            if left:
                carry[name] = logs[:, logs.shape[1] - left :]
            logs = _chunk_log_mean(logs, chunk)
            if pend:
                pending[field] = rows(logs[:, :pend])
                logs = logs[:, pend:]
        series[name] = rows(logs)
    if "theta" in pending:
        pending["theta"] = max_lr * pending["theta"].exp()
    if pending:
        memory = memory.with_pending_gates(**pending)
    theta = max_lr * series["lr"].exp()
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


class NeuralMemory(nn.Module):
    """The neural long-term memory of one block (memory-math.md sections 1-3).

    ``forward(x, state=None, cu_seqlens=None) -> (out, state)``: ``x`` [B, T, dim]. With ``cu_seqlens``
    (document boundaries of a packed batch of one row, like FlashAttention's), the memory and the convolutions
    restart at every boundary and the returned state is the last document's. An empty ``x`` (T = 0) gives an empty
    output and the state unchanged. With ``check_finite`` (the default) a call whose memory output or state is not
    finite raises :class:`~titans_compose.ops.memory.finite.MemoryDivergedError` naming the first such token (one
    reduction and one host synchronisation per call; switch it off for speed once a rule is known to be stable).
    """

    def __init__(
        self,
        dim: int,
        memory: Any,
        update: Any,
        projections: Any,
        registry: Registry,
        *,
        eps: float = 1e-6,
        backend: str | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.check_finite = check_finite
        self.dim, self.heads, self.head_dim = dim, memory.heads, memory.head_dim
        self.config: MemoryConfig = memory_config(memory, update, registry)
        self.dispatch = MemoryBackend(backend)
        width = self.heads * self.head_dim
        self.proj_activation = registry.get("activation", projections.activation).obj.fn
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, width, bias=False) for _ in range(3))
        self.conv_kernel = projections.conv_kernel
        self.convs = nn.ModuleDict()
        if self.conv_kernel is not None:
            for name in ("q", "k", "v"):
                self.convs[name] = nn.Conv1d(width, width, self.conv_kernel, groups=width, bias=False)
        self.qk_l2norm = projections.qk_l2norm
        self.max_lr = update.lr.max_lr
        self.lr_gate = _Gate(dim, self.heads, update.lr.gate, _logit(update.lr.init / update.lr.max_lr))
        self.momentum_gate = (
            _Gate(dim, self.heads, update.momentum.gate, _logit(update.momentum.init))
            if update.momentum.enabled
            else None
        )
        keep0 = 2.0 ** (-1.0 / update.forget.half_life)  # alpha_0 = 1 - 2^(-1/half_life)
        self.forget_gate = (
            _Gate(dim, self.heads, update.forget.gate, _logit(1.0 - keep0)) if update.forget.enabled else None
        )
        self.init_weights = nn.ParameterList()
        for out_f, in_f in self.config.layer_shapes:
            w = torch.randn(self.heads, out_f, in_f) / math.sqrt(in_f)
            if memory.init == "zero":
                w.zero_()
            self.init_weights.append(nn.Parameter(w, requires_grad=memory.init == "learned"))
        self.readout_norm = nn.Parameter(torch.ones(self.heads, self.head_dim)) if memory.readout_norm else None
        self.eps = eps
        self.output_gate = memory.output_gate
        self.gate_proj = nn.Linear(dim, width, bias=False) if memory.output_gate != "none" else None
        self.out_proj = nn.Linear(width, dim, bias=False) if memory.out_proj else None

    @classmethod
    def from_block(cls, block: Any, model: Any, registry: Registry, **kwargs: Any) -> NeuralMemory:
        """The memory of a validated spec block (any kind with memory, update and projections sections)."""
        return cls(model.dim, block.memory, block.update, block.projections, registry, eps=block.norm.eps, **kwargs)

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

    def initial_state(self, batch: int) -> NeuralMemoryState:
        """The state before any token: M_0 for every batch row, zero momentum, empty convolution history."""
        weights = [
            w.unsqueeze(0).expand(batch, *w.shape).reshape(batch * self.heads, *w.shape[1:]) for w in self.init_weights
        ]
        return NeuralMemoryState(MemoryState.initial(weights, self.config.momentum), None)

    def _project(
        self, name: str, proj: nn.Linear, x: Tensor, conv_state: dict[str, Tensor] | None, new_conv: dict[str, Tensor]
    ) -> Tensor:
        h = self.proj_activation(proj(x))
        if self.conv_kernel is None:
            return h
        history = self.conv_kernel - 1
        prev = h.new_zeros(h.shape[0], history, h.shape[2]) if conv_state is None else conv_state[name]
        full = torch.cat([prev, h], 1)
        new_conv[name] = full[:, full.shape[1] - history :]
        return _depthwise_causal_conv(full, self.convs[name].weight[:, 0, :])

    def _heads(self, t: Tensor) -> Tensor:
        """[B, T, H*d] -> [B*H, T, d]."""
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2).reshape(b * self.heads, n, self.head_dim)

    def gates(self, x: Tensor, state: NeuralMemoryState | None = None) -> InnerGates:
        """theta, log eta, log(1 - alpha) [B*H, T] for the tokens of ``x`` continuing ``state`` (see
        :func:`inner_gates`)."""
        state = self.initial_state(x.shape[0]) if state is None else state
        gates = {"lr": self.lr_gate, "momentum": self.momentum_gate, "forget": self.forget_gate}
        return inner_gates(gates, self.max_lr, self.config.chunk_size, x, state.memory, state.gates)

    # ------------------------------------------------------------------------------------------------ forward

    def forward(
        self, x: Tensor, state: NeuralMemoryState | None = None, cu_seqlens: Tensor | list[int] | None = None
    ) -> tuple[Tensor, NeuralMemoryState]:
        if cu_seqlens is not None:
            return self._forward_documents(x, state, cu_seqlens)
        batch, length, _ = x.shape
        state = self.initial_state(batch) if state is None else state
        if length == 0:  # nothing to read or write
            return x.new_zeros(batch, 0, self.dim if self.out_proj is not None else self.heads * self.head_dim), state
        new_conv: dict[str, Tensor] = {}
        q = self._project("q", self.q_proj, x, state.conv, new_conv)
        k = self._project("k", self.k_proj, x, state.conv, new_conv)
        v = self._project("v", self.v_proj, x, state.conv, new_conv)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.qk_l2norm:
            q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        gates = self.gates(x, state)
        series = (gates.theta, gates.log_eta, gates.log_keep)
        y, memory_state = self.dispatch(q, k, v, *series, gates.memory, self.config)
        if self.check_finite and not torch.compiler.is_compiling() and not finite_flag(y, memory_state):
            token, cause = first_nonfinite_token(k, v, *series, gates.memory, self.config)
            raise MemoryDivergedError(type(self).__name__, token, "of this call", cause)
        y = y.view(batch, self.heads, length, self.head_dim).transpose(1, 2)  # [B, T, H, d]
        if self.readout_norm is not None:
            y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps) * self.readout_norm
        y = y.reshape(batch, length, self.heads * self.head_dim)
        if self.gate_proj is not None:
            g = self.gate_proj(x)
            y = y * (torch.sigmoid(g) if self.output_gate == "sigmoid" else F.silu(g))
        if self.out_proj is not None:
            y = self.out_proj(y)
        return y, NeuralMemoryState(memory_state, new_conv or None, gates.carry)

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
