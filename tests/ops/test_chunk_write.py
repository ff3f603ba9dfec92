"""The chunk write's hand-written backward against plain autograd through the same forward (float64).

Both differentiate the identical chunked computation, so they may differ only by summation order: every gradient
(initial weights, q, k, v, theta, log eta, log keep) and the carried state's gradients must agree to 1e-10
relative. The grid covers depth, activation, loss, momentum / forget, residual / LayerNorm, retrieval and chunk
sizes that do not divide the length (theta <= 0.1: a deep linear memory without norms diverges at 0.3);
the sequential reference is checked separately in tests/ops/test_memory_core.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
import zlib

import pytest
import torch

from tests.grids import fast_subset
from tests.helpers import ROOT, make_cfg, make_inputs, rel, run
from titans_compose.ops.memory import chunk_write, mlp
from titans_compose.ops.memory.chunked import chunked_memory
from titans_compose.ops.memory.reference import reference_memory

GRID = [
    dict(depth=depth, activation=act, loss=loss, momentum=mom, forget=fgt, residual=res, output_norm=ln)
    for depth, act, loss, (mom, fgt, res, ln) in itertools.product(
        [1, 2, 3],
        ["silu", "gelu", "relu", "identity"],
        ["l2", "l1", "lp", "huber"],
        # (momentum, forget, residual, output_norm)
        [
            (True, True, True, True),
            (False, False, False, False),
            (True, False, False, True),
            (False, True, True, False),
        ],
    )
]


def case_seed(*parts: object) -> int:
    """A seed in [0, 1000) from a case's parameters, the same in every process: ``hash()`` of a string is salted per
    process (PYTHONHASHSEED), so a seed made from it changes the inputs from run to run."""
    return zlib.crc32(repr(parts).encode()) % 1000


def test_case_seeds_do_not_depend_on_the_process():
    code = "from tests.ops.test_chunk_write import case_seed; print(case_seed('after', 2, 'silu', 'l2', True))"
    seeds = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": salt},
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for salt in ("1", "2")
    }
    assert len(seeds) == 1, seeds


def gradients(cfg, seed, monkeypatch, backward, zero_keys=(), fn=chunked_memory):
    """Outputs and the gradients of a random linear function of the outputs and final state with respect to every
    input, through ``fn`` with the chunk ``backward``; the keys of the tokens ``zero_keys`` are zero."""
    monkeypatch.setenv(chunk_write.ENV_VAR, backward)
    q, k, v, theta, log_eta, log_keep, weights = make_inputs(cfg, T=23, seed=seed, requires_grad=True, theta_max=0.1)
    with torch.no_grad():
        k[:, list(zero_keys)] = 0.0
    y, state = run(fn, cfg, q, k, v, theta, log_eta, log_keep, weights)
    g = torch.Generator().manual_seed(seed + 1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    for w in (*state.weights, *(state.momentum or ())):
        loss = loss + (w * torch.randn(w.shape, generator=g, dtype=w.dtype)).sum()
    leaves = [t for t in (q, k, v, theta, log_eta, log_keep, *weights) if t is not None]
    return y.detach(), torch.autograd.grad(loss, leaves)


def assert_manual_equals_autograd(case: dict, retrieval: str, chunk: int, monkeypatch) -> None:
    cfg = make_cfg(chunk_size=chunk, retrieval=retrieval, **case)
    assert_manual_equals_autograd_for(cfg, case_seed(retrieval, *case.values()), monkeypatch)


def assert_manual_equals_autograd_for(cfg, seed: int, monkeypatch, zero_keys=()) -> None:
    y_m, g_m = gradients(cfg, seed, monkeypatch, "manual", zero_keys)
    y_a, g_a = gradients(cfg, seed, monkeypatch, "autograd", zero_keys)
    assert torch.isfinite(y_a).all() and rel(y_m, y_a) < 1e-12
    for got, want in zip(g_m, g_a, strict=True):
        assert torch.isfinite(got).all()
        assert rel(got, want) < 1e-10


@pytest.mark.parametrize("case", fast_subset(GRID), ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("retrieval,chunk", [("after", 4), ("before", 5), ("per_chunk", 8)])
def test_manual_backward_equals_autograd(case, retrieval, chunk, monkeypatch):
    assert_manual_equals_autograd(case, retrieval, chunk, monkeypatch)


WITHOUT_SECOND_DERIVATIVES = [
    dict(depth=depth, activation=act, loss=loss, momentum=True, forget=True, residual=res, output_norm=ln)
    for depth, act, loss, (res, ln) in itertools.product(
        [1, 2], ["gelu", "relu"], ["l2", "l1", "huber"], [(True, True), (False, False)]
    )
]


@pytest.mark.parametrize(
    "case", fast_subset(WITHOUT_SECOND_DERIVATIVES), ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
def test_manual_backward_without_second_derivatives_equals_autograd(case, monkeypatch):
    """A plug-in activation or loss need not state ``grad2``: the hand-written backward then takes the
    second-order terms from autograd on the rule's elementwise backward (0 where that has no graph, as for ReLU and
    l1) and must still agree with plain autograd."""
    cfg = make_cfg(chunk_size=4, retrieval="after", **case)
    bare = dataclasses.replace(
        cfg,
        activation=dataclasses.replace(cfg.activation, grad2=None),
        loss=dataclasses.replace(cfg.loss, grad2=None),
    )
    assert_manual_equals_autograd_for(bare, seed=case_seed(*case.values()), monkeypatch=monkeypatch)


@pytest.mark.parametrize("loss", ["l2", "l1", "lp", "huber"])
@pytest.mark.parametrize("residual,output_norm", [(True, True), (False, True), (True, False), (False, False)])
def test_output_error_vjp_closed_form_equals_autograd(loss, residual, output_norm):
    """The closed-form pull-back through the loss's second derivative and the LayerNorm against autograd on
    :func:`mlp.output_error` (float64, random upstream gradient, errors of order 1 so every loss branch acts)."""
    cfg = make_cfg(loss=loss, residual=residual, output_norm=output_norm)
    g = torch.Generator().manual_seed(3)
    z, k, v, up = (torch.randn(3, 5, cfg.head_dim, generator=g, dtype=torch.float64) for _ in range(4))
    closed = mlp.output_error_vjp(up, z, k, v, cfg)
    auto = mlp.output_error_vjp(up, z, k, v, dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, grad2=None)))
    assert (closed[1] is None) == (auto[1] is None) == (not residual)
    for got, want in zip(closed, auto, strict=True):
        if want is not None:
            assert torch.isfinite(got).all() and rel(got, want) < 1e-12


def test_manual_backward_gradcheck(monkeypatch):
    """Finite differences through the hand-written backward (depth 2, GELU, residual + LayerNorm, momentum,
    forget, two full chunks and a partial one)."""
    monkeypatch.setenv(chunk_write.ENV_VAR, "manual")
    cfg = make_cfg(depth=2, d=3, hidden=4, activation="gelu", chunk_size=3, residual=True, output_norm=True)
    q, k, v, theta, log_eta, log_keep, weights = make_inputs(cfg, T=7, N=1, requires_grad=True)

    def fn(*args):
        y, state = run(chunked_memory, cfg, *args[:6], list(args[6:]))
        return y, *state.weights, *state.momentum

    assert torch.autograd.gradcheck(fn, (q, k, v, theta, log_eta, log_keep, *weights), eps=1e-6, atol=1e-7)


CLIPPED = [
    dict(depth=depth, activation=act, loss=loss, momentum=mom, forget=fgt, residual=res, output_norm=ln, grad_clip=clip)
    for depth, act, loss, (mom, fgt, res, ln), clip in itertools.product(
        [1, 2, 3],
        ["silu", "gelu"],
        ["l2", "huber"],
        [(True, True, True, True), (False, False, False, False), (True, False, False, True)],
        [0.5, 8.0],
    )
]


@pytest.mark.parametrize("case", fast_subset(CLIPPED), ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("retrieval,chunk", [("after", 4), ("before", 5), ("per_chunk", 8)])
def test_manual_backward_with_the_gradient_clip_equals_autograd(case, retrieval, chunk, monkeypatch):
    """The per-token clip scales each token's gradient by min(1, max_norm / ||g_t||), a function of every layer's
    errors and inputs: its derivative enters the hand-written backward. The tokens' gradient norms at the initial
    weights here are 1-10 (depth 1 and 3 without norms) and 7-55 (depth 2 with LayerNorm), so clip 0.5 acts on every
    token and 8.0 on some, none or most."""
    assert_manual_equals_autograd(case, retrieval, chunk, monkeypatch)


def test_manual_backward_gradcheck_with_the_gradient_clip(monkeypatch):
    monkeypatch.setenv(chunk_write.ENV_VAR, "manual")
    cfg = make_cfg(depth=2, d=3, hidden=4, activation="gelu", chunk_size=3, residual=True, grad_clip=0.3)
    q, k, v, theta, log_eta, log_keep, weights = make_inputs(cfg, T=7, N=1, requires_grad=True)

    def fn(*args):
        y, state = run(chunked_memory, cfg, *args[:6], list(args[6:]))
        return y, *state.weights, *state.momentum

    assert torch.autograd.gradcheck(fn, (q, k, v, theta, log_eta, log_keep, *weights), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("depth,residual,output_norm", [(1, False, False), (2, True, True), (3, False, True)])
@pytest.mark.parametrize("retrieval", ["after", "per_chunk"])
def test_a_zero_inner_gradient_under_the_clip_has_finite_gradients(
    depth, residual, output_norm, retrieval, monkeypatch
):
    """A token with a zero key has a zero inner gradient (every layer's input is zero: SiLU(0) = 0), so ||g_t|| = 0 in
    the clip factor min(1, max_norm / ||g_t||). Plain autograd through 1/sqrt(||g_t||^2) gave NaN (an infinite
    derivative times the clamp's zero); the hand-written backward, plain autograd and the sequential reference (with
    its own autograd, float64) must all be finite and agree. Zero keys at the start, middle and end of chunks and in
    the partial last chunk (chunk 4, T = 23)."""
    cfg = make_cfg(depth, chunk_size=4, retrieval=retrieval, residual=residual, output_norm=output_norm, grad_clip=0.5)
    zero = (0, 5, 11, 22)
    assert_manual_equals_autograd_for(cfg, 5, monkeypatch, zero)
    y_m, g_m = gradients(cfg, 5, monkeypatch, "manual", zero)
    y_r, g_r = gradients(cfg, 5, monkeypatch, "manual", zero, fn=reference_memory)
    assert rel(y_m, y_r) < 1e-10
    for got, want in zip(g_r, g_m, strict=True):
        assert torch.isfinite(got).all() and rel(got, want) < 1e-8


def test_only_an_explicit_request_turns_the_manual_backward_off(monkeypatch):
    monkeypatch.delenv(chunk_write.ENV_VAR, raising=False)
    assert chunk_write.supported(make_cfg(grad_clip=1.0)) and chunk_write.supported(make_cfg())
    monkeypatch.setenv(chunk_write.ENV_VAR, "autograd")
    assert not chunk_write.supported(make_cfg())
