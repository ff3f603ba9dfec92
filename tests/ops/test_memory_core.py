"""The memory core: the chunked dual form against the sequential reference (float64, forward and every gradient),
closed-form special cases, state carrying, and numerical robustness.

Tolerances: float64 forward 1e-10 relative and gradients 1e-8 relative. The two paths differ in summation order
and in how gradients are formed (autograd per token against the hand-written backward); the worst forward error
measured over the full option grid is 1.4e-12. Realistic gates are used (alpha ~ 0.05, eta ~ 0.9, theta <= 0.3):
with extreme forgetting the recurrence itself amplifies rounding by ~1e6 (a 1e-14 change of the values moves the
reference's own output by ~6e-9), which no implementation can avoid. Float32 chunked against the float64
reference: 2e-4 relative (measured 1.8e-6).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from tests.grids import fast_subset
from tests.helpers import F64, LOSS_PARAMS, make_cfg, make_inputs, rel, run
from titans_compose.ops.memory import mlp
from titans_compose.ops.memory.chunked import GateTables, LastRow, chunked_memory, coefficients, segsum
from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.ops.memory.dispatch import MemoryBackend
from titans_compose.ops.memory.reference import reference_memory
from titans_compose.ops.memory.state import MemoryState
from titans_compose.registry.rules import ACTIVATIONS


def assert_paths_agree(cfg, T=21, tol=1e-10, theta_max=0.3):
    inputs = make_inputs(cfg, T=T, theta_max=theta_max)
    y_c, s_c = run(chunked_memory, cfg, *inputs)
    y_r, s_r = run(reference_memory, cfg, *inputs)
    assert torch.isfinite(y_c).all()
    assert rel(y_c, y_r) < tol
    for a, b in zip(s_c.weights, s_r.weights, strict=True):
        assert rel(a, b) < tol
    if cfg.momentum:
        for a, b in zip(s_c.momentum, s_r.momentum, strict=True):
            assert rel(a, b) < tol
    assert s_c.pending_len == s_r.pending_len == T % cfg.chunk_size


FULL_GRID = list(
    itertools.product(
        [1, 2, 3],  # depth
        [True, False],  # momentum
        [True, False],  # forget
        [True, False],  # residual
        [True, False],  # LayerNorm
        sorted(LOSS_PARAMS),
        [1, 4, 16],  # chunk size b (T = 21: never a multiple of b > 1)
        ["after", "before", "per_chunk"],
    )
)


@pytest.mark.parametrize("depth,momentum,forget,residual,output_norm,loss,chunk,retrieval", fast_subset(FULL_GRID, 2))
def test_chunked_equals_reference(depth, momentum, forget, residual, output_norm, loss, chunk, retrieval):
    """Every combination of the memory options (1728 cases): outputs, chunk-end weights and momentum agree.
    theta <= 0.1 here: with momentum, no forgetting and no LayerNorm, theta up to 0.3 makes the inner optimisation
    itself diverge (the reference reaches 1e129 by token 20 and both paths give NaN)."""
    cfg = make_cfg(
        depth,
        loss=loss,
        chunk_size=chunk,
        retrieval=retrieval,
        momentum=momentum,
        forget=forget,
        residual=residual,
        output_norm=output_norm,
    )
    assert_paths_agree(cfg, T=21, theta_max=0.1)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_chunked_equals_reference_for_every_activation(activation):
    assert_paths_agree(make_cfg(2, activation=activation, chunk_size=4))


def test_gradient_clipping_agrees():
    cfg = make_cfg(2, chunk_size=4, grad_clip=0.05)
    assert_paths_agree(cfg)
    inputs = make_inputs(cfg)
    unclipped = run(chunked_memory, make_cfg(2, chunk_size=4), *inputs)[0]
    assert rel(run(chunked_memory, cfg, *inputs)[0], unclipped) > 1e-3  # the clip is active


GRADIENT_CASES = [
    *[dict(depth=d, chunk=b, retrieval=r) for d in (1, 2, 3) for b in (1, 4) for r in ("after", "before", "per_chunk")],
    *[dict(depth=2, chunk=4, retrieval="after", loss=loss) for loss in ("l1", "lp", "huber")],
    dict(depth=2, chunk=4, retrieval="after", momentum=False),
    dict(depth=2, chunk=4, retrieval="after", forget=False),
    dict(depth=2, chunk=4, retrieval="after", momentum=False, forget=False, residual=False, output_norm=False),
    dict(depth=3, chunk=16, retrieval="before", grad_clip=0.05),
]


@pytest.mark.parametrize("case", GRADIENT_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_every_gradient_agrees(case):
    """d(scalar loss)/d(W_0, q, k, v, theta, log eta, log keep) of the two paths agree to 1e-8 relative; the
    output is weighted by a random tensor so every position matters, and the final weights enter the loss."""
    options = dict(case)
    depth, chunk, retrieval = options.pop("depth"), options.pop("chunk"), options.pop("retrieval")
    options.setdefault("residual", True)
    options.setdefault("output_norm", depth > 1)
    cfg = make_cfg(depth, chunk_size=chunk, retrieval=retrieval, **options)
    grads = []
    for fn in (chunked_memory, reference_memory):
        inputs = make_inputs(cfg, T=13, requires_grad=True, theta_max=0.1)
        y, state = run(fn, cfg, *inputs)
        weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
        scalar = (y * weight).sum() + sum(w.square().sum() for w in state.weights)
        leaves = [t for t in (*inputs[:6], *inputs[6]) if t is not None]
        grads.append(torch.autograd.grad(scalar, leaves))
    for a, b in zip(*grads, strict=True):
        assert rel(a, b) < 1e-8


def test_gradcheck_tiny():
    cfg = make_cfg(2, d=3, hidden=4, chunk_size=2, residual=True, output_norm=True)
    q, k, v, theta, log_eta, log_keep, weights = make_inputs(cfg, T=5, N=1, requires_grad=True)

    def fn(q, k, v, theta, log_eta, log_keep, w1, w2):
        y, state = chunked_memory(q, k, v, theta, log_eta, log_keep, MemoryState.initial([w1, w2], True), cfg)
        return y, state.weights[0], state.momentum[1]

    assert torch.autograd.gradcheck(fn, (q, k, v, theta, log_eta, log_keep, *weights), eps=1e-6, atol=1e-7)


def test_float32_agrees_with_float64_reference():
    cfg = make_cfg(2, chunk_size=16, residual=True, output_norm=True)
    inputs = make_inputs(cfg, T=64)
    y64 = run(reference_memory, cfg, *inputs)[0]
    as32 = [t.float() if isinstance(t, torch.Tensor) else [w.float() for w in t] for t in inputs]
    y32 = run(chunked_memory, cfg, *as32)[0]
    assert y32.dtype == torch.float32 and rel(y32.double(), y64) < 2e-4


def test_segsum_and_coefficients_in_closed_form():
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)
    s = segsum(x)[0]
    assert s[2, 0].item() == pytest.approx(1.0) and s[1, 1].item() == 0 and s[0, 1].item() == float("-inf")
    g = torch.Generator().manual_seed(0)
    theta, log_eta, log_keep = (torch.rand(1, 4, generator=g, dtype=F64) for _ in range(3))
    log_eta, log_keep = log_eta.log(), log_keep.log()
    c = coefficients(theta, log_eta, log_keep)
    eta, keep = log_eta.exp()[0], log_keep.exp()[0]
    # memory-math.md section 3.1, checked at t = 1: W_1 = (1 - alpha_1) W^0 + eta_1 S^0 - theta_1 G_1
    assert c.A[0, 0].item() == pytest.approx(keep[0].item()) and c.B[0, 0].item() == pytest.approx(eta[0].item())
    assert c.C[0, 0, 0].item() == pytest.approx(theta[0, 0].item())
    # C[t, i] = theta_i sum_{j=i..t} prod_{j<m<=t} keep_m prod_{i<m<=j} eta_m
    t, i = 3, 1
    expect = theta[0, i] * sum(keep[j + 1 : t + 1].prod() * eta[i + 1 : j + 1].prod() for j in range(i, t + 1))
    assert c.C[0, t, i].item() == pytest.approx(expect.item())
    assert (c.C[0].triu(1) == 0).all()


@pytest.mark.parametrize("momentum,forget", [(True, True), (True, False), (False, True), (False, False)])
def test_last_row_equals_the_coefficient_tables_last_row(momentum, forget):
    """The fold's coefficients built directly (suffix sums and one b x b table) against the last row of the
    spelled-out A, B, C, D, E, with gates from near 0 to near 1 (log eta and log keep down to -30)."""
    g = torch.Generator().manual_seed(5)
    theta = torch.rand(3, 2, 9, generator=g, dtype=F64)
    log_eta = -30 * torch.rand(3, 2, 9, generator=g, dtype=F64) ** 4 if momentum else None
    log_keep = -30 * torch.rand(3, 2, 9, generator=g, dtype=F64) ** 4 if forget else None
    full = coefficients(theta, log_eta, log_keep)
    last = LastRow.build(theta, log_eta, log_keep)
    assert rel(last.c, full.C[..., -1, :]) < 1e-14
    assert (last.keep is None) == (not forget) and (last.e is None) == (not momentum)
    if forget:
        assert rel(last.keep, full.A[..., -1]) < 1e-14
    if momentum:
        assert rel(last.e, full.E[..., -1, :]) < 1e-14 and rel(last.carry, full.B[..., -1]) < 1e-14
        assert rel(last.decay, full.D[..., -1]) < 1e-14
    for i, row in enumerate(last.unbind(1)):
        assert torch.equal(row.c, last.c[:, i])
    # a per-token read's tables give the same rows
    tables = GateTables.build(log_eta, log_keep, theta.shape, theta.dtype, theta.device, "after")
    read_off = LastRow.from_tables(tables, theta)
    for name in ("c", "e", "keep", "carry", "decay"):
        got, want = getattr(read_off, name), getattr(last, name)
        assert (got is None) == (want is None) and (want is None or rel(got, want) < 1e-14)


def test_depth1_l2_b1_is_the_delta_rule():
    """L = 1, squared loss, no momentum, no forget, b = 1: M_t = M_{t-1} - 2 theta_t (M_{t-1} k_t - v_t) k_t^T."""
    cfg = make_cfg(1, chunk_size=1, momentum=False, forget=False)
    q, k, v, theta, _, _, weights = make_inputs(cfg, T=17)
    y, state = run(chunked_memory, cfg, q, k, v, theta, None, None, weights)
    m = weights[0].clone()
    outs = []
    for t in range(17):
        beta = 2 * theta[:, t, None, None]
        m = m - beta * (m @ k[:, t, :, None] - v[:, t, :, None]) @ k[:, t, None, :]
        outs.append((m @ q[:, t, :, None]).squeeze(-1))
    assert rel(y, torch.stack(outs, 1)) < 1e-12 and rel(state.weights[0], m) < 1e-12


def test_large_chunk_without_momentum_or_forget_is_minibatch_gd():
    """alpha = eta = 0: the chunk-end weights are W^0 - sum_i theta_i g_i(W^0) (TTT-style mini-batch GD), with
    gradients from an independent autograd MLP."""
    cfg = make_cfg(2, chunk_size=8, momentum=False, forget=False, retrieval="per_chunk")
    q, k, v, theta, _, _, weights = make_inputs(cfg, T=24)
    y, state = run(chunked_memory, cfg, q, k, v, theta, None, None, weights)
    w = [x.clone() for x in weights]
    outs = []
    for start in range(0, 24, 8):
        w0 = [x.detach().requires_grad_() for x in w]
        pred = F.silu(k[:, start : start + 8] @ w0[0].transpose(1, 2)) @ w0[1].transpose(1, 2)
        per_token = (pred - v[:, start : start + 8]).square().sum(-1)
        outs.append(F.silu(q[:, start : start + 8] @ w0[0].transpose(1, 2)) @ w0[1].transpose(1, 2))
        grads = torch.autograd.grad((per_token * theta[:, start : start + 8]).sum(), w0)
        w = [x - g for x, g in zip(w0, grads, strict=True)]
    assert rel(y, torch.cat(outs, 1).detach()) < 1e-12
    for a, b in zip(state.weights, w, strict=True):
        assert rel(a, b.detach()) < 1e-12


@pytest.mark.parametrize("fn", [chunked_memory, reference_memory], ids=["chunked", "reference"])
@pytest.mark.parametrize("cuts", [[5, 9, 23], [1] * 23, [16, 7], [4, 4, 4, 11], [0, 5, 0, 9, 9, 0]])
def test_pieces_carrying_state_equal_one_call(fn, cuts):
    cfg = make_cfg(2, chunk_size=4, residual=True, output_norm=True)
    q, k, v, theta, log_eta, log_keep, weights = make_inputs(cfg, T=sum(cuts))
    whole, whole_state = run(fn, cfg, q, k, v, theta, log_eta, log_keep, weights)
    state, outs, start = MemoryState.initial(weights, True), [], 0
    for n in cuts:
        sl = slice(start, start + n)
        y, state = fn(q[:, sl], k[:, sl], v[:, sl], theta[:, sl], log_eta[:, sl], log_keep[:, sl], state, cfg)
        outs.append(y)
        start += n
    assert rel(torch.cat(outs, 1), whole) < 1e-10
    assert state.pending_len == whole_state.pending_len
    for a, b in zip(state.weights, whole_state.weights, strict=True):
        assert rel(a, b) < 1e-10


def assert_same_state(a: MemoryState, b: MemoryState) -> None:
    """Equal weights, momentum and pending tokens (values, not identity)."""
    assert a.pending_len == b.pending_len
    pending = [] if a.pending is None else zip(vars(a.pending).values(), vars(b.pending).values(), strict=True)
    pairs = [*zip(a.weights, b.weights, strict=True), *zip(a.momentum or (), b.momentum or (), strict=True), *pending]
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in pairs)


@pytest.mark.parametrize(
    "fn", [chunked_memory, reference_memory, MemoryBackend("chunked")], ids=["chunked", "reference", "dispatch"]
)
def test_empty_input_gives_empty_output_and_the_state_unchanged(fn):
    """T = 0, on a fresh state and with 2 pending tokens; and a batch of 0 rows."""
    cfg = make_cfg(2, chunk_size=4)
    q, k, v, theta, log_eta, log_keep, weights = make_inputs(cfg, T=6)
    fresh = MemoryState.initial(weights, True)
    _, pending = fn(q, k, v, theta, log_eta, log_keep, fresh, cfg)
    assert pending.pending_len == 2
    for state in (fresh, pending):
        none = slice(0, 0)
        y, after = fn(
            q[:, none], k[:, none], v[:, none], theta[:, none], log_eta[:, none], log_keep[:, none], state, cfg
        )
        assert y.shape == (3, 0, cfg.head_dim)
        assert_same_state(after, state)
    rows = make_inputs(cfg, T=6, N=0)
    y, state = run(fn, cfg, *rows)
    assert y.shape == (0, 6, cfg.head_dim) and state.pending_len == 2 and state.weights[0].shape[0] == 0


def recall_error(cfg: MemoryConfig, pairs: int, theta: float, passes: int, seed: int = 0) -> tuple[float, ...]:
    """Mean relative recall error ||M(k) - v|| / ||v|| on the written pairs before and after reading them
    ``passes`` times, and on unseen keys after. Momentum and forgetting off, fixed theta, no outer training."""
    g = torch.Generator().manual_seed(seed)
    d = cfg.head_dim
    k = F.normalize(torch.randn(1, pairs, d, generator=g, dtype=F64), dim=-1)
    v = torch.randn(1, pairs, d, generator=g, dtype=F64) / d**0.5
    unseen = F.normalize(torch.randn(1, pairs, d, generator=g, dtype=F64), dim=-1)
    weights = [torch.randn(1, o, i, generator=g, dtype=F64) / i**0.5 for o, i in cfg.layer_shapes]
    state = MemoryState.initial(weights, False)
    for _ in range(passes):
        _, state = chunked_memory(k, k, v, torch.full((1, pairs), theta, dtype=F64), None, None, state, cfg)

    def err(weights_: list[torch.Tensor], keys: torch.Tensor) -> float:
        return ((mlp.forward(weights_, keys, cfg) - v).norm(dim=-1) / v.norm(dim=-1)).mean().item()

    return err(weights, k), err(state.weights, k), err(state.weights, unseen)


@pytest.mark.parametrize("depth,theta", [(1, 0.5), (2, 0.2)])
def test_the_memory_learns_at_test_time(depth, theta):
    """After reading 8 random key/value pairs 10 times (head dim 16, hidden 64, b = 1, no outer training), the
    recall error on them falls far below the error before reading and below the error on unseen keys.
    Measured: depth 1 before 1.61, after 0.03, unseen 1.81; depth 2 before 1.08, after 0.09, unseen 1.42."""
    cfg = make_cfg(depth, d=16, hidden=64, chunk_size=1, momentum=False, forget=False)
    before, after, unseen = recall_error(cfg, pairs=8, theta=theta, passes=10)
    assert after < 0.2 * before and after < 0.2 * unseen


def test_extreme_inputs_stay_finite():
    """Huge keys/values, alpha at 0 and 1 and eta at 0 and 1 (logits +-60): forward and backward are finite."""
    cfg = make_cfg(2, chunk_size=8, residual=True, output_norm=True)
    q, k, v, theta, _, _, weights = make_inputs(cfg, T=40)
    k = (k * 1e3).requires_grad_()
    v = (v * 1e3).requires_grad_()
    logits = torch.tensor([60.0, -60.0], dtype=F64).repeat(q.shape[0], 20)
    log_eta = F.logsigmoid(logits).requires_grad_()
    log_keep = F.logsigmoid(-logits.flip(-1)).requires_grad_()
    y, state = run(chunked_memory, cfg, q, k, v, theta, log_eta, log_keep, weights)
    assert torch.isfinite(y).all() and all(torch.isfinite(w).all() for w in state.weights)
    grads = torch.autograd.grad(y.sum(), [k, v, log_eta, log_keep])
    assert all(torch.isfinite(g).all() for g in grads)
