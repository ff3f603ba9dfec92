"""Attention against a query-by-query reference written from the definitions (float64), and its causality."""

from __future__ import annotations

import math

import pytest
import torch

from titans_compose.nn.attention import Attention, rope

F64 = torch.float64
DIM, HEADS, HEAD_DIM = 12, 3, 4


def make(kind, **kw) -> Attention:
    torch.manual_seed(0)
    return Attention(DIM, HEADS, HEAD_DIM, kind, **kw).to(F64)


def visible(module: Attention, i: int, length: int, n_p: int) -> list[tuple[str, int, int]]:
    """(source, index, rope position) of every key query i may see, from the definitions."""
    if module.kind != "segment":
        first = 0 if module.window is None else max(0, i - module.window + 1)
        return [("p", j, j) for j in range(n_p)] + [("x", j, n_p + j) for j in range(first, i + 1)]
    start = i // module.segment * module.segment
    n = min(module.segment, length - start)
    local = i - start
    offsets, pos = {}, 0
    for name in module.order:
        offsets[name] = pos
        pos += n_p if name == "persistent" else n
    keys = [("p", j, offsets["persistent"] + j) for j in range(n_p)]
    last_h = local if module.causal_memory else n - 1
    keys += [("h", start + j, offsets["memory"] + j) for j in range(last_h + 1)]
    keys += [("x", start + j, offsets["segment"] + j) for j in range(local + 1)]
    return keys


def query_position(module: Attention, i: int, length: int, n_p: int) -> int:
    if module.kind != "segment":
        return n_p + i
    start = i // module.segment * module.segment
    n = min(module.segment, length - start)
    pos = 0
    for name in module.order:
        if name == "segment":
            return pos + i - start
        pos += n_p if name == "persistent" else n
    raise AssertionError


def reference(module: Attention, x, persistent=None, memory=None):
    batch, length, _ = x.shape
    n_p = 0 if persistent is None else persistent.shape[0]
    wq = module.q.weight.view(HEADS, HEAD_DIM, DIM)
    wk, wv = (w.view(HEADS, HEAD_DIM, DIM) for w in module.kv.weight.chunk(2, dim=0))
    out = torch.zeros(batch, length, HEADS * HEAD_DIM, dtype=x.dtype)
    for b in range(batch):
        for i in range(length):
            keys = visible(module, i, length, n_p)
            src = {"p": persistent, "x": x[b], "h": None if memory is None else memory[b]}
            kx = torch.stack([src[s][j] for s, j, _ in keys])
            kpos = torch.tensor([p for _, _, p in keys])
            qpos = torch.tensor([query_position(module, i, length, n_p)])
            for h in range(HEADS):
                q = (wq[h] @ x[b, i])[None]
                k = kx @ wk[h].T
                if module.use_rope:
                    q, k = rope(q, qpos, module.rope_theta), rope(k, kpos, module.rope_theta)
                weights = torch.softmax((k @ q[0]) / math.sqrt(HEAD_DIM), dim=0)
                out[b, i, h * HEAD_DIM : (h + 1) * HEAD_DIM] = weights @ (kx @ wv[h].T)
    return module.out(out)


def inputs(length=11, n_p=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, DIM, generator=g, dtype=F64)
    persistent = torch.randn(n_p, DIM, generator=g, dtype=F64) if n_p else None
    memory = torch.randn(2, length, DIM, generator=g, dtype=F64)
    return x, persistent, memory


@pytest.mark.parametrize("kind,window", [("sliding_window", 3), ("sliding_window", 1), ("full", None)])
@pytest.mark.parametrize("n_p", [0, 2])
@pytest.mark.parametrize("use_rope", [True, False])
def test_window_attention_matches_reference(kind, window, n_p, use_rope):
    module = make(kind, window=window, rope=use_rope)
    x, persistent, _ = inputs(n_p=n_p)
    assert torch.allclose(module(x, persistent), reference(module, x, persistent), atol=1e-12)


@pytest.mark.parametrize("order", [["persistent", "memory", "segment"], ["persistent", "segment", "memory"]])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segment", [4, 20])
def test_segment_attention_matches_reference(order, causal, segment):
    module = make("segment", segment=segment, order=order, causal_memory_tokens=causal)
    x, persistent, memory = inputs(length=11)
    got = module(x, persistent, memory)
    assert torch.allclose(got, reference(module, x, persistent, memory), atol=1e-12)


def test_order_changes_the_result_only_through_positions():
    x, persistent, memory = inputs()
    a = make("segment", segment=4, order=["persistent", "memory", "segment"])(x, persistent, memory)
    b = make("segment", segment=4, order=["persistent", "segment", "memory"])(x, persistent, memory)
    assert not torch.allclose(a, b)
    c = make("segment", segment=4, order=["persistent", "memory", "segment"], rope=False)(x, persistent, memory)
    d = make("segment", segment=4, order=["persistent", "segment", "memory"], rope=False)(x, persistent, memory)
    assert torch.allclose(c, d, atol=1e-12)


@pytest.mark.parametrize("kind", ["sliding_window", "full", "segment"])
def test_no_output_depends_on_a_future_token(kind):
    module = make(kind, window=4, segment=4, order=["persistent", "memory", "segment"])
    x, persistent, memory = inputs(length=13)
    base = module(x, persistent, memory)
    for t in range(13):
        x2, m2 = x.clone(), memory.clone()
        x2[:, t] += 1.0
        m2[:, t] += 1.0
        moved = module(x2, persistent, m2)
        assert torch.allclose(moved[:, :t], base[:, :t], atol=1e-12), t
        assert not torch.allclose(moved[:, t], base[:, t])


def test_non_causal_memory_tokens_see_the_whole_segment():
    module = make("segment", segment=4, order=["persistent", "memory", "segment"], causal_memory_tokens=False)
    x, persistent, memory = inputs(length=8)
    m2 = memory.clone()
    m2[:, 3] += 1.0
    moved, base = module(x, persistent, m2), module(x, persistent, memory)
    assert not torch.allclose(moved[:, 0], base[:, 0])  # same segment, earlier position
    assert torch.allclose(moved[:, 4:], base[:, 4:], atol=1e-12)  # next segment: its own memory tokens


def test_sliding_window_forgets_beyond_the_window():
    module = make("sliding_window", window=3)
    x, persistent, _ = inputs(length=10)
    x2 = x.clone()
    x2[:, 2] += 1.0
    moved, base = module(x2, persistent), module(x, persistent)
    assert not torch.allclose(moved[:, 4], base[:, 4])
    assert torch.allclose(moved[:, 5:], base[:, 5:], atol=1e-12)
