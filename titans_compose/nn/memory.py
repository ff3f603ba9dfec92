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

from titans_compose.kernels.config import MemoryConfig, memory_config
from titans_compose.kernels.dispatch import BackendChoice, MemoryBackend
from titans_compose.kernels.state import MemoryState
from titans_compose.registry.core import Registry


@dataclass(frozen=True)
class NeuralMemoryState:
    """The memory state (per batch row and head) and the causal convolutions' last inputs."""

    memory: MemoryState
    conv: dict[str, Tensor] | None

    def detach(self) -> NeuralMemoryState:
        conv = None if self.conv is None else {k: t.detach() for k, t in self.conv.items()}
        return NeuralMemoryState(self.memory.detach(), conv)


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


def _chunk_log_mean(log_values: Tensor, offset: int, chunk: int) -> Tensor:
    """log(mean over each chunk of exp(log_values)) broadcast back to the tokens; [B, T, H], chunk grid starting
    ``offset`` tokens before this call."""
    b, t, h = log_values.shape
    front = offset % chunk
    padded_len = math.ceil((front + t) / chunk) * chunk
    padded = log_values.new_full((b, padded_len, h), float("-inf"))
    padded[:, front : front + t] = log_values
    blocks = padded.view(b, padded_len // chunk, chunk, h)
    counts = torch.isfinite(blocks).sum(2, keepdim=True).clamp_min(1)
    means = torch.logsumexp(blocks, 2, keepdim=True) - counts.log()
    return means.expand_as(blocks).reshape(b, padded_len, h)[:, front : front + t]


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
    restart at every boundary and the returned state is the last document's.
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
    ) -> None:
        super().__init__()
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

    def _gate_series(self, gate: _Gate, x: Tensor, log_fn: Any, offset: int) -> Tensor:
        """Log gate values per token [B*H, T] with the gate's granularity."""
        logs = log_fn(gate(x))
        if gate.granularity == "per_chunk":
            logs = _chunk_log_mean(logs, offset, self.config.chunk_size)
        return logs.transpose(1, 2).reshape(-1, x.shape[1])

    def gates(self, x: Tensor, offset: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """theta [B*H, T], log eta, log(1 - alpha) for the tokens of ``x``."""
        theta = self.max_lr * self._gate_series(self.lr_gate, x, F.logsigmoid, offset).exp()
        log_eta = None if self.momentum_gate is None else self._gate_series(self.momentum_gate, x, F.logsigmoid, offset)
        log_keep = None
        if self.forget_gate is not None:
            log_keep = self._gate_series(self.forget_gate, x, lambda z: F.logsigmoid(-z), offset)
        return theta, log_eta, log_keep

    # ------------------------------------------------------------------------------------------------ forward

    def forward(
        self, x: Tensor, state: NeuralMemoryState | None = None, cu_seqlens: Tensor | list[int] | None = None
    ) -> tuple[Tensor, NeuralMemoryState]:
        if cu_seqlens is not None:
            return self._forward_documents(x, state, cu_seqlens)
        batch, length, _ = x.shape
        state = self.initial_state(batch) if state is None else state
        new_conv: dict[str, Tensor] = {}
        q = self._project("q", self.q_proj, x, state.conv, new_conv)
        k = self._project("k", self.k_proj, x, state.conv, new_conv)
        v = self._project("v", self.v_proj, x, state.conv, new_conv)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.qk_l2norm:
            q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        theta, log_eta, log_keep = self.gates(x, state.memory.pending_len)
        y, memory_state = self.dispatch(q, k, v, theta, log_eta, log_keep, state.memory, self.config)
        y = y.view(batch, self.heads, length, self.head_dim).transpose(1, 2)  # [B, T, H, d]
        if self.readout_norm is not None:
            y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps) * self.readout_norm
        y = y.reshape(batch, length, self.heads * self.head_dim)
        if self.gate_proj is not None:
            g = self.gate_proj(x)
            y = y * (torch.sigmoid(g) if self.output_gate == "sigmoid" else F.silu(g))
        if self.out_proj is not None:
            y = self.out_proj(y)
        return y, NeuralMemoryState(memory_state, new_conv or None)

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
        return torch.cat(outs, 1), last
