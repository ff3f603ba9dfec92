"""Softmax attention with the masks Titans needs: sliding window or full causal attention with an always-visible
persistent prefix (MAG, MAL, the baseline), and MAC's segment attention over [persistent || memory tokens ||
segment].

The masks are explicit boolean tensors handed to ``scaled_dot_product_attention``, so the same code is correct on
the CPU and on a GPU. Positions for RoPE follow the concatenated order, so MAC's ``order`` option changes relative
positions as it would in the paper's concatenation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary position embedding on the last axis of ``x`` [..., n, d] (d even) at integer ``positions`` [n]."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angles = (positions.to(torch.float64)[:, None] * freqs[None, :]).to(x.dtype)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1)


def window_mask(length: int, prefix: int, window: int | None, device: torch.device) -> Tensor:
    """[length, prefix + length] boolean mask: query i sees every prefix key and sequence keys j with
    i - window < j <= i (all j <= i when ``window`` is None)."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    seen = j <= i
    if window is not None:
        seen = seen & (j > i - window)
    return torch.cat([torch.ones(length, prefix, dtype=torch.bool, device=device), seen], dim=1)


def segment_mask(length: int, prefix: int, causal_memory: bool, order: list[str], device: torch.device) -> Tensor:
    """[length, keys] mask for one MAC segment of ``length`` tokens: the persistent prefix always, the memory
    tokens h_j for j <= i (or all of them when not ``causal_memory``), segment tokens j <= i; keys in ``order``."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    causal = j <= i
    parts = {
        "persistent": torch.ones(length, prefix, dtype=torch.bool, device=device),
        "memory": causal if causal_memory else torch.ones(length, length, dtype=torch.bool, device=device),
        "segment": causal,
    }
    return torch.cat([parts[name] for name in order], dim=1)


class Attention(nn.Module):
    """Multi-head attention of one block (the graph's ``attention`` node).

    ``kind``: ``sliding_window``, ``full`` or ``segment`` (MAC). ``forward(x, persistent=None, memory=None)``:
    ``x`` [B, T, dim]; ``persistent`` [N_p, dim] learned tokens; ``memory`` [B, T, dim] MAC memory tokens (one per
    position, read before each segment). Returns [B, T, dim] at the positions of ``x``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        kind: str,
        *,
        window: int | None = None,
        rope: bool = True,
        rope_theta: float = 10000.0,
        segment: int | None = None,
        order: list[str] | None = None,
        causal_memory_tokens: bool = True,
    ) -> None:
        super().__init__()
        if kind not in ("sliding_window", "full", "segment"):
            raise ValueError(f"unknown attention kind {kind!r}")
        if kind == "segment" and (segment is None or order is None):
            raise ValueError("segment attention needs `segment` and `order`")
        self.heads, self.head_dim, self.kind = heads, head_dim, kind
        self.window = window if kind == "sliding_window" else None
        self.use_rope, self.rope_theta = rope, rope_theta
        self.segment, self.order, self.causal_memory = segment, order, causal_memory_tokens
        self.q = nn.Linear(dim, heads * head_dim, bias=False)
        self.kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, dim, bias=False)

    def _split(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def _attend(self, queries: Tensor, keys: Tensor, q_pos: Tensor, k_pos: Tensor, mask: Tensor) -> Tensor:
        """queries [B, n, dim] against key sources [B, m, dim] with a [n, m] mask."""
        q = self._split(self.q(queries))
        k, v = (self._split(t) for t in self.kv(keys).chunk(2, dim=-1))
        if self.use_rope:
            q, k = rope(q, q_pos, self.rope_theta), rope(k, k_pos, self.rope_theta)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(queries.shape[0], queries.shape[1], -1))

    def forward(self, x: Tensor, persistent: Tensor | None = None, memory: Tensor | None = None) -> Tensor:
        batch, length, _ = x.shape
        prefix = x.new_zeros(0, x.shape[-1]) if persistent is None else persistent
        n_p = prefix.shape[0]
        prefix = prefix.unsqueeze(0).expand(batch, -1, -1)
        if self.kind != "segment":
            positions = torch.arange(n_p + length, device=x.device)
            keys = torch.cat([prefix, x], dim=1)
            mask = window_mask(length, n_p, self.window, x.device)
            return self._attend(x, keys, positions[n_p:], positions, mask)
        if memory is None:
            raise ValueError("segment attention needs the memory tokens")
        outs = []
        for start in range(0, length, self.segment):
            seg = x[:, start : start + self.segment]
            mem = memory[:, start : start + self.segment]
            n = seg.shape[1]
            parts = {"persistent": prefix, "memory": mem, "segment": seg}
            keys = torch.cat([parts[name] for name in self.order], dim=1)
            offsets, pos = {}, 0
            for name in self.order:
                offsets[name] = pos
                pos += parts[name].shape[1]
            k_pos = torch.arange(pos, device=x.device)
            q_pos = k_pos[offsets["segment"] : offsets["segment"] + n]
            mask = segment_mask(n, n_p, self.causal_memory, self.order, x.device)
            outs.append(self._attend(seg, keys, q_pos, k_pos, mask))
        return torch.cat(outs, dim=1)
