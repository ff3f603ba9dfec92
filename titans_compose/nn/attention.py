"""Softmax attention with the masks Titans needs: sliding window or full causal attention with an always-visible
persistent prefix (MAG, MAL, the baseline), and MAC's segment attention over [persistent || memory tokens ||
segment].

The masks are explicit boolean tensors handed to ``scaled_dot_product_attention``, so the same code is correct on
the CPU and on a GPU. Positions for RoPE follow the concatenated order, so MAC's ``order`` option changes relative
positions as it would in the paper's concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_compose.nn.context import Spread, to_heads, to_sequence


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary position embedding on the last axis of ``x`` [..., n, d] (d even) at integer ``positions`` [n]."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angles = (positions.to(torch.float64)[:, None] * freqs[None, :]).to(x.dtype)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1)


def window_mask(length: int, prefix: int, window: int | None, device: torch.device, past: int = 0) -> Tensor:
    """[length, prefix + past + length] boolean mask: query i (at sequence index past + i, after ``past`` cached
    keys) sees every prefix key and sequence keys j with past + i - window < j <= past + i (all j <= past + i when
    ``window`` is None)."""
    i = torch.arange(past, past + length, device=device)[:, None]
    j = torch.arange(past + length, device=device)[None, :]
    seen = j <= i
    if window is not None:
        seen = seen & (j > i - window)
    return torch.cat([torch.ones(length, prefix, dtype=torch.bool, device=device), seen], dim=1)


def segment_mask(
    length: int, prefix: int, causal_memory: bool, order: list[str], device: torch.device, past: int = 0
) -> Tensor:
    """[length, keys] mask for ``length`` tokens of one MAC segment after its first ``past`` tokens: the persistent
    prefix always, the memory tokens h_j for j <= i (or all of them when not ``causal_memory``), segment tokens
    j <= i; keys in ``order``."""
    i = torch.arange(past, past + length, device=device)[:, None]
    j = torch.arange(past + length, device=device)[None, :]
    causal = j <= i
    parts = {
        "persistent": torch.ones(length, prefix, dtype=torch.bool, device=device),
        "memory": causal if causal_memory else torch.ones_like(causal),
        "segment": causal,
    }
    return torch.cat([parts[name] for name in order], dim=1)


@dataclass(frozen=True)
class KVCache:
    """Sliding-window / full attention keys and values (RoPE applied) of the last sequence tokens, [B, heads, m, d]
    each, and how many sequence tokens came before this call (their positions)."""

    keys: Tensor
    values: Tensor
    seen: int

    def detach(self) -> KVCache:
        return KVCache(self.keys.detach(), self.values.detach(), self.seen)


class Attention(nn.Module):
    """Multi-head attention of one block (the graph's ``attention`` node).

    ``kind``: ``sliding_window``, ``full`` or ``segment`` (MAC). ``forward(x, persistent=None, memory=None)``:
    ``x`` [B, T, dim]; ``persistent`` [N_p, dim] learned tokens; ``memory`` [B, T, dim] MAC memory tokens (one per
    position, read before each segment). Returns [B, T, dim] at the positions of ``x``.

    RoPE positions of a MAC segment follow the concatenation of its parts at their actual lengths; with
    ``full_segment_positions`` the memory tokens and the segment take ``segment`` positions each even when the
    segment is not full, so a token's positions do not depend on how many tokens follow it in its segment (what
    streaming and generation need: the model sets it).
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
        full_segment_positions: bool = False,
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
        self.full_segment_positions = full_segment_positions
        self.q = nn.Linear(dim, heads * head_dim, bias=False)
        self.kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, dim, bias=False)

    def share(self, spread: Spread | None) -> slice:
        """The heads a call computes: all of them, or, with ``spread`` (context parallelism), this rank's share."""
        return slice(0, self.heads) if spread is None else spread.context.heads(self.heads, "an attention")

    def _per_head(self, t: Tensor) -> Tensor:
        """[..., n, heads * head_dim] -> [..., n, heads, head_dim]."""
        return t.unflatten(-1, (self.heads, self.head_dim))

    def _keys_values(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values of ``source`` [..., n, dim] per head, [..., n, heads, head_dim] each (token-wise)."""
        k, v = self.kv(source).chunk(2, dim=-1)
        return self._per_head(k), self._per_head(v)

    def _prefix(self, persistent: Tensor, heads: slice, batch: int) -> tuple[Tensor, Tensor]:
        """The keys and values of the persistent tokens [N_p, dim] for ``heads``, [B, h, N_p, d] each (no RoPE)."""
        k, v = (t[:, heads].transpose(0, 1).expand(batch, -1, -1, -1) for t in self._keys_values(persistent))
        return k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, spread: Spread | None) -> Tensor:
        """Split-head q [B, h, n, d] against k, v [B, h, m, d] with a [n, m] mask -> [B, n, dim]; with ``spread``
        the heads' outputs go back to the ranks that hold the queries' tokens first ([B, n_rank, dim])."""
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)  # [B, n, h, d]
        if spread is not None:
            y = to_sequence(y, spread)
        return self.out(y.flatten(2))

    def forward(self, x: Tensor, persistent: Tensor | None = None, memory: Tensor | None = None) -> Tensor:
        if self.kind != "segment":
            return self.forward_cached(x, persistent)[0]
        if memory is None:
            raise ValueError("segment attention needs the memory tokens")
        outs = [
            self.forward_segment(
                x[:, start : start + self.segment], persistent, memory[:, start : start + self.segment]
            )
            for start in range(0, x.shape[1], self.segment)
        ]
        return torch.cat(outs, dim=1)

    def forward_cached(
        self,
        x: Tensor,
        persistent: Tensor | None = None,
        cache: KVCache | None = None,
        spread: Spread | None = None,
    ) -> tuple[Tensor, KVCache]:
        """Sliding-window / full attention of ``x`` continuing after the tokens in ``cache``; returns the output and
        the cache for the next call (the last ``window - 1`` tokens' keys and values: all a later query can see).
        With ``spread`` (context parallelism: ``x`` holds this rank's tokens of a piece that starts the stream, with
        no cache), the scores run over the whole piece for this rank's share of the heads, whose keys and values
        the cache holds."""
        if spread is not None and cache is not None:
            raise ValueError("a context-parallel attention call starts the stream: it takes no cache")
        heads = self.share(spread)
        q, (k, v) = self._per_head(self.q(x)), self._keys_values(x)
        if spread is not None:
            q, k, v = to_heads([q, k, v], spread)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, h, n, d]
        batch, length = q.shape[0], q.shape[2]
        n_p = 0 if persistent is None else persistent.shape[0]
        seen = 0 if cache is None else cache.seen
        positions = torch.arange(n_p + seen, n_p + seen + length, device=x.device)
        if self.use_rope:
            q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        if cache is not None:
            k, v = torch.cat([cache.keys, k], 2), torch.cat([cache.values, v], 2)
        past = k.shape[2] - length
        keep = k.shape[2] if self.window is None else min(self.window - 1, k.shape[2])
        new_cache = KVCache(k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :], seen + length)
        if persistent is not None:
            pk, pv = self._prefix(persistent, heads, batch)
            if self.use_rope:
                pk = rope(pk, torch.arange(n_p, device=x.device), self.rope_theta)
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        mask = window_mask(length, n_p, self.window, x.device, past=past)
        return self._attend(q, k, v, mask, spread), new_cache

    def forward_segment(
        self,
        x: Tensor,
        persistent: Tensor | None,
        memory: Tensor,
        past: tuple[Tensor, Tensor] | None = None,
        spread: Spread | None = None,
    ) -> Tensor:
        """MAC attention for tokens ``x`` (memory tokens ``memory``) of one segment whose earlier tokens and memory
        tokens are ``past`` (None at the segment start): keys [persistent || memory || segment] in ``order``. With
        ``spread`` (context parallelism: ``x`` and ``memory`` hold this rank's tokens of a whole segment, no
        ``past``), the scores run over the whole segment for this rank's share of the heads."""
        if spread is not None and past is not None:
            raise ValueError("a context-parallel segment attention call takes whole segments: no past")
        heads = self.share(spread)
        done = 0 if past is None else past[0].shape[1]
        x_all = x if past is None else torch.cat([past[0], x], 1)
        mem_all = memory if past is None else torch.cat([past[1], memory], 1)
        q, (kx, vx), (km, vm) = self._per_head(self.q(x)), self._keys_values(x_all), self._keys_values(mem_all)
        if spread is not None:
            q, kx, vx, km, vm = to_heads([q, kx, vx, km, vm], spread)
        q, kx, vx, km, vm = (t.transpose(1, 2) for t in (q, kx, vx, km, vm))  # [B, h, n, d]
        batch, length = q.shape[0], q.shape[2]
        if persistent is None:
            pk = pv = kx.new_zeros(batch, kx.shape[1], 0, self.head_dim)
        else:
            pk, pv = self._prefix(persistent, heads, batch)
        parts = {"persistent": (pk, pv), "memory": (km, vm), "segment": (kx, vx)}
        sizes = {name: part[0].shape[2] for name, part in parts.items()}
        offsets, pos = {}, 0
        for name in self.order:
            offsets[name] = pos
            pos += self.segment if self.full_segment_positions and name != "persistent" else sizes[name]
        k = torch.cat([parts[name][0] for name in self.order], 2)
        v = torch.cat([parts[name][1] for name in self.order], 2)
        if self.use_rope:
            k_pos = torch.cat([torch.arange(sizes[name], device=x.device) + offsets[name] for name in self.order])
            q_pos = torch.arange(length, device=x.device) + offsets["segment"] + done
            q, k = rope(q, q_pos, self.rope_theta), rope(k, k_pos, self.rope_theta)
        mask = segment_mask(length, sizes["persistent"], self.causal_memory, self.order, x.device, past=done)
        return self._attend(q, k, v, mask, spread)
