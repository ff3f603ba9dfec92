"""The inner update's stability region (titans_compose.spec.stability, docs/stability.md): its maps against the
sequential reference recurrence, its closed forms, the TCW04 warning built on it, and the runtime error when a
memory it warns about does diverge.

The maps are checked exactly (float64, 1e-9 relative: a few dozen tokens of a linear recurrence whose entries are
O(1), so only rounding separates the two); the region's edge is checked by running the reference just inside and
just outside it.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import SPECS
from tests.helpers import make_cfg
from titans_compose.builder import build
from titans_compose.cli.main import cli
from titans_compose.ops.memory.finite import MemoryDivergedError
from titans_compose.ops.memory.reference import reference_memory
from titans_compose.ops.memory.state import MemoryState
from titans_compose.registry import new_registry
from titans_compose.spec import load_spec
from titans_compose.spec.stability import (
    cycle_map,
    largest_stable_beta_cycle,
    largest_stable_beta_revisit,
    repeated_key_map,
    revisit_map,
    spectral_radius,
    stable_theta,
)

F64 = torch.float64
#: the issue's example: a matrix memory with momentum 0.9 and theta 0.3 (max_lr 0.5 admits it), in the paper's form
ISSUE_RULE = [
    "update.momentum.form=paper",
    "update.lr.scale=none",
    "memory.depth=1",
    "memory.output_norm=false",
    "update.lr.max_lr=0.5",
    "update.lr.init=0.3",
    "update.momentum.init=0.9",
]
LMM = SPECS / "titans_lmm_small.yaml"


def gates(n: int, length: int, theta: float, eta: float, alpha: float) -> tuple[torch.Tensor, ...]:
    full = torch.full((n, length), 1.0, dtype=F64)
    return theta * full, math.log(eta) * full, math.log1p(-alpha) * full


def run_reference(keys: torch.Tensor, theta: float, eta: float, alpha: float, chunk: int, seed: int = 0):
    """The reference recurrence of a depth-1 memory on ``keys`` [T, d] with zero targets (so the recurrence is
    linear and homogeneous), from random weights and zero momentum; returns (W_0, W_T, S_T) of one row."""
    length, d = keys.shape
    cfg = make_cfg(depth=1, d=d, chunk_size=chunk)
    w0 = torch.randn(1, d, d, dtype=F64, generator=torch.Generator().manual_seed(seed))
    k = keys.unsqueeze(0)
    _, state = reference_memory(
        k, k, torch.zeros_like(k), *gates(1, length, theta, eta, alpha), MemoryState.initial((w0,), True), cfg
    )
    return w0[0], state.weights[0][0], state.momentum[0][0]


def apply(matrix, m: torch.Tensor, s: torch.Tensor, times: int) -> tuple[torch.Tensor, torch.Tensor]:
    for _ in range(times):
        m, s = matrix[0] * m + matrix[1] * s, matrix[2] * m + matrix[3] * s
    return m, s


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_repeated_key_map_is_the_reference_along_the_key(chunk):
    """A key repeated on every token: after n chunks, (W k, S k) is the chunk map to the n-th power applied to
    (W_0 k, 0), for a chunk size that makes the gradients of a chunk add up."""
    theta, eta, alpha, chunks = 0.004, 0.9, 0.01, 5
    k = torch.nn.functional.normalize(torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(1)), dim=0)
    w0, w, s = run_reference(k.expand(chunk * chunks, 6), theta, eta, alpha, chunk)
    matrix = repeated_key_map(2 * theta, eta, 1 - alpha, chunk)
    m_pred, s_pred = apply(matrix, w0 @ k, torch.zeros(6, dtype=F64), chunks)
    assert rel(w @ k, m_pred) < 1e-9 and rel(s @ k, s_pred) < 1e-9


@pytest.mark.parametrize("period", [1, 2, 5])
def test_revisit_map_is_the_reference_for_orthogonal_keys(period):
    """Keys cycling through an orthonormal basis of width ``period`` (chunk size 1): every direction follows the
    revisit map once per cycle, so after n cycles the first direction's (W q, S q) is its n-th power."""
    theta, eta, alpha, cycles = 0.3, 0.8, 0.02, 7
    basis = torch.linalg.qr(torch.randn(period, period, dtype=F64, generator=torch.Generator().manual_seed(2)))[0]
    w0, w, s = run_reference(basis.T.repeat(cycles, 1), theta, eta, alpha, 1)
    q = basis[:, 0]
    m_pred, s_pred = apply(
        revisit_map(2 * theta, eta, 1 - alpha, period), w0 @ q, torch.zeros(period, dtype=F64), cycles
    )
    assert rel(w @ q, m_pred) < 1e-9 and rel(s @ q, s_pred) < 1e-9


@pytest.mark.parametrize("period,chunk", [(4, 3), (3, 4), (1, 5), (6, 1)])
def test_cycle_map_is_the_reference_with_stale_chunk_gradients(period, chunk):
    """Orthonormal keys cycling with period p in chunks of b (each gradient at its chunk's start): after n times
    lcm(p, b) tokens the first direction's (W q, S q) is the cycle map's n-th power; with p = 1 it is the repeated-key
    map and with b = 1 the revisit map."""
    theta, eta, alpha, repeats = 0.05, 0.9, 0.01, 4
    length = period * chunk // math.gcd(period, chunk)
    basis = torch.linalg.qr(torch.randn(period, period, dtype=F64, generator=torch.Generator().manual_seed(5)))[0]
    w0, w, s = run_reference(basis.T.repeat(length * repeats // period, 1), theta, eta, alpha, chunk)
    q = basis[:, 0]
    matrix = cycle_map(2 * theta, eta, 1 - alpha, period, chunk)
    m_pred, s_pred = apply(matrix, w0 @ q, torch.zeros(period, dtype=F64), repeats)
    assert rel(w @ q, m_pred) < 1e-9 and rel(s @ q, s_pred) < 1e-9
    if period == 1:
        assert matrix == pytest.approx(repeated_key_map(2 * theta, eta, 1 - alpha, chunk), rel=1e-12)
    if chunk == 1:
        assert matrix == pytest.approx(revisit_map(2 * theta, eta, 1 - alpha, period), rel=1e-12)


@pytest.mark.parametrize("eta,chunk", [(0.9, 2), (0.9, 4), (0.99, 2), (0.5, 4)])
def test_no_cycle_period_is_worse_than_the_two_patterns_validation_uses(eta, chunk):
    """The bound validation quotes, min(repeated key in a chunk, fresh keys), is at or below the bound of every
    orthogonal cycle period up to 3 chunks and at 4 and 8 chunks, at every phase."""
    bound = stable_theta(eta, 0.0, chunk).theta
    for period in [*range(1, 3 * chunk + 1), 4 * chunk, 8 * chunk]:
        assert bound <= largest_stable_beta_cycle(eta, 1.0, period, chunk) / 2 * (1 + 1e-9), period


def test_spectral_radius_and_the_closed_forms():
    """The 2 x 2 spectral radius against torch's eigenvalues, and the bounds' closed forms: a key repeated on every
    token (chunk 1) is stable up to 2 theta = (1 + eta)(2 - alpha); keys seen once and never again up to
    2 theta / (1 - eta) = 2; without momentum a chunk of b repeated keys up to theta = 1 / b."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        a = torch.randn(2, 2, dtype=F64, generator=gen)
        expected = float(torch.linalg.eigvals(a).abs().max())
        assert spectral_radius(tuple(a.flatten().tolist())) == pytest.approx(expected, rel=1e-12)
    for eta, alpha in [(0.0, 0.0), (0.5, 0.1), (0.9, 0.0), (0.9, 0.3), (0.99, 1e-3)]:
        assert stable_theta(eta, alpha, 1).repeated == pytest.approx((1 + eta) * (2 - alpha) / 2, rel=1e-12)
    for eta in (0.5, 0.9, 0.99):
        assert stable_theta(eta, 0.0, 16).fresh == pytest.approx(1 - eta, rel=1e-6)
    assert stable_theta(0.0, 0.0, 16).repeated == pytest.approx(1 / 16, rel=1e-12)
    assert largest_stable_beta_revisit(0.9, 1.0, 1) == pytest.approx(3.8, rel=1e-12)


@pytest.mark.parametrize("period", [1, 4, 64])
def test_the_bound_is_the_edge_of_divergence(period):
    """Just inside the bound of a revisit period the reference's weights stay within their start, just outside they
    grow (period 1 overflows to nan within the run); and the spectral radius at the bound is 1."""
    eta, alpha = 0.9, 0.0
    bound = largest_stable_beta_revisit(eta, 1 - alpha, period) / 2
    assert spectral_radius(revisit_map(2 * bound, eta, 1 - alpha, period)) == pytest.approx(1.0, abs=1e-9)
    basis = torch.linalg.qr(torch.randn(period, period, dtype=F64, generator=torch.Generator().manual_seed(4)))[0]
    keys = basis.T.repeat(4096 // period, 1)
    growth = {}
    for factor in (0.9, 1.1):
        w0, w, _ = run_reference(keys, factor * bound, eta, alpha, 1)
        growth[factor] = float(w.norm() / w0.norm())
    assert growth[0.9] < 10 and not growth[1.1] <= 1e3  # overflowing to nan counts as growth


def test_the_issues_example_diverges_as_predicted():
    """Depth 1, momentum 0.9, theta 0.3, random unit keys of width 64, chunk 1, float64: |y| passes 1e60 by token
    4096, and the analysis puts theta 0.3 outside the region (fresh keys: theta <= 1 - eta = 0.1); theta 0.05,
    inside it, stays bounded on the same keys."""
    length, d = 4096, 64
    gen = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(1, length, d, dtype=F64, generator=gen), dim=-1)
    v = torch.randn(1, length, d, dtype=F64, generator=gen) / math.sqrt(d)
    w0 = torch.randn(1, d, d, dtype=F64, generator=gen) / math.sqrt(d)
    from titans_compose.ops.memory.chunked import chunked_memory  # equal to the reference (test_memory_core)

    peak = {}
    for theta in (0.3, 0.05):
        y, _ = chunked_memory(
            k,
            k,
            v,
            *gates(1, length, theta, 0.9, 0.0)[:2],
            None,
            MemoryState.initial((w0,), True),
            make_cfg(depth=1, d=d, chunk_size=1, forget=False),
        )
        peak[theta] = float(y.abs().max())
    assert peak[0.3] > 1e60 and peak[0.05] < 10
    assert stable_theta(0.9, 0.0, 1).theta == pytest.approx(0.1, rel=1e-6)


def warnings_of(overrides: list[str], spec=LMM):
    return [w for w in load_spec(spec, overrides, registry=new_registry()).warnings if w.code == "TCW04"]


def test_the_warning_fires_on_the_issues_rule_at_max_lr(tmp_path):
    """Written in a file: the warning points at the line of update.lr.max_lr and quotes the bounds and the fix."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"extends: {LMM}\nmemory:\n  depth: 1\n  output_norm: false\n  chunk_size: 1\n"
        "update:\n  lr:\n    max_lr: 0.5\n    init: 0.3\n    scale: none\n  momentum: {init: 0.9, form: paper}\n"
        "  forget: off\n"
    )
    (found,) = [w for w in load_spec(spec, registry=new_registry()).warnings if w.code == "TCW04"]
    assert found.severity == "warning" and found.path == "update.lr.max_lr"
    assert (found.location.file, found.location.line) == (str(spec), 8)
    assert "theta <= 1.9 when a key repeats" in found.message and "theta <= 0.1 for keys" in found.message
    assert found.hint.startswith("lower update.lr.max_lr to 0.1 and update.lr.init below it (now 0.3)")


def test_the_warning_uses_the_chunk_size_and_stays_quiet_inside_the_region():
    """Chunks of 16 repeated keys add their steps: the default chunk size bounds theta at 0.0094; a rule inside
    that region, a memory with an output LayerNorm, a gradient clip or a deeper memory get no warning."""
    (found,) = warnings_of(ISSUE_RULE)
    assert "theta <= 0.00937 when a key repeats (a chunk's 16 steps add up)" in found.message
    assert "lower update.lr.max_lr to 0.0093 and update.lr.init below it" in found.hint
    stable = ["memory.depth=1", "memory.output_norm=false", "update.lr.max_lr=0.009", "update.lr.init=0.001"]
    assert warnings_of(stable) == []
    assert warnings_of([*ISSUE_RULE, "memory.chunk_size=1", "update.lr.max_lr=0.09", "update.lr.init=0.05"]) == []
    assert warnings_of([*ISSUE_RULE, "memory.output_norm=true"]) == []
    assert warnings_of([*ISSUE_RULE, "update.grad_clip=1.0"]) == []
    assert warnings_of([*ISSUE_RULE, "memory.depth=2"]) == []


@pytest.mark.parametrize("chunk", [1, 2, 4, 8, 16, 64])
@pytest.mark.parametrize("half_life", [None, 2048.0])
def test_the_ema_forms_worst_decay_is_no_momentum(chunk, half_life):
    """In the EMA form the scan sees theta (1 - eta), so its region in theta is stable_theta(eta) / (1 - eta); over
    eta in [0, 0.999] (steps of 0.01 and 0.99-0.999) it is smallest at eta = 0, where the form is the momentum-free
    rule: what TCW04 checks for the EMA form, whatever the gate learns."""
    alpha = 0.0 if half_life is None else -math.expm1(-math.log(2.0) / half_life)
    at0 = stable_theta(0.0, alpha, chunk).theta
    for eta in [i / 100 for i in range(1, 100)] + [0.995, 0.999]:
        assert stable_theta(eta, alpha, chunk).theta / (1 - eta) >= at0 * (1 - 1e-9), eta


def test_the_warning_for_the_ema_form_and_the_head_dim_scale():
    """The EMA form is checked at eta -> 0: chunks of 16 bound theta at 0.0625 (1 / b), whatever momentum.init;
    with lr.scale: head_dim, theta = max_lr / 64, so max_lr is bounded at 64 times that."""
    ema = [*ISSUE_RULE, "update.momentum.form=ema"]
    (found,) = warnings_of(ema)
    assert "EMA momentum" in found.message and "theta <= 0.0625 when a key repeats" in found.message
    assert "lower update.lr.max_lr to 0.062 and update.lr.init below it" in found.hint
    assert "lower the momentum" not in found.hint
    assert warnings_of([*ema, "update.lr.max_lr=0.06", "update.lr.init=0.01"]) == []
    assert warnings_of([*ema, "update.lr.max_lr=0.06", "update.lr.init=0.01", "update.momentum.init=0.99"]) == []
    assert warnings_of([*ISSUE_RULE, "update.lr.max_lr=0.06", "update.lr.init=0.01"]) != []  # the paper form
    (scaled,) = warnings_of([*ISSUE_RULE, "update.lr.scale=head_dim", "update.lr.max_lr=4"])
    assert "(theta = max_lr / 64 with lr.scale: head_dim)" in scaled.message
    assert "lower update.lr.max_lr to 0.59," in scaled.hint  # 64 x 0.00933, rounded down
    assert warnings_of([*ISSUE_RULE, "update.lr.scale=head_dim", "update.lr.max_lr=0.5"]) == []


def test_no_shipped_spec_warns():
    for spec in [*SPECS.glob("*.yaml"), *(SPECS / "ablations").glob("*.yaml")]:
        assert warnings_of([], spec) == [], spec


def test_validate_shows_the_warning_and_succeeds(runner):
    result = runner.invoke(cli, ["validate", str(LMM), *(x for o in ISSUE_RULE for x in ("--set", o))])
    assert result.exit_code == 0, result.output
    assert "update.lr.max_lr: warning: update.lr.max_lr = 0.5 lets the inner update diverge" in result.output
    assert "[TCW04]" in result.output


def test_the_issues_rule_stops_the_model_with_a_clear_error():
    """The rule the warning names, built and run in float32 on random bytes: the forward raises
    MemoryDivergedError naming the memory layer, the first token whose weights overflow, and the fix."""
    small = ["model.dim=32", "memory.heads=1", "memory.head_dim=16", "memory.residual=false"]
    model = build(LMM, [*ISSUE_RULE, *small, "memory.chunk_size=1"], smoke=False).module
    tokens = torch.randint(0, 256, (2, 4096), generator=torch.Generator().manual_seed(0))
    with pytest.raises(
        MemoryDivergedError, match=r"memory layer L\d\.memory: the memory weights are not finite"
    ) as caught:
        model(tokens)
    assert 0 < caught.value.token < 4096 and "lower update.lr (max_lr or init)" in str(caught.value)
