"""When the inner update of a matrix memory diverges: the exact stability region of its recurrence along one key
direction (docs/stability.md derives it; benchmarks/inner_stability.py checks it against the reference recurrence).

For a depth-1 memory without an output LayerNorm and the squared loss, the memory's value along a key direction k
(m = M k) and the momentum's value along it (s = S k) follow a linear recurrence whose matrix depends only on the
step beta = 2 theta ||k||^2, the momentum decay eta, the keep factor kappa = 1 - alpha and the chunk size b; the
part of M orthogonal to the keys only decays. The recurrence is stable when that 2 x 2 matrix has spectral radius
at most 1. Two key patterns bound what a spec admits:

- a key repeated within a chunk: every gradient of the chunk is taken at the chunk-start weights, so the chunk's
  b steps add up before the error they correct is measured again (:func:`repeated_key_map`);
- keys that come back every p tokens and are orthogonal to the others: a gradient's momentum keeps moving the
  memory for about 1 / (1 - eta) tokens, its cumulative step 2 theta / (1 - eta) lands before the direction is
  seen again, and the memory overshoots when that exceeds 2 (:func:`revisit_map`, worst over p).

Plain floats, no torch: validation calls :func:`stable_theta` on every block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

#: a 2 x 2 matrix (row major) acting on the column (m, s)
Matrix = tuple[float, float, float, float]

#: revisit periods p searched for the worst case: every p up to this, then doublings up to 2^40 (with forgetting
#: the worst p is finite, about where the forget gate's decay starts to matter; without it, the limit p -> inf)
_DENSE_PERIODS = 4096


def _mul(a: Matrix, b: Matrix) -> Matrix:
    return (
        a[0] * b[0] + a[1] * b[2],
        a[0] * b[1] + a[1] * b[3],
        a[2] * b[0] + a[3] * b[2],
        a[2] * b[1] + a[3] * b[3],
    )


def _power(a: Matrix, n: int) -> Matrix:
    out: Matrix = (1.0, 0.0, 0.0, 1.0)
    while n:
        if n & 1:
            out = _mul(out, a)
        a, n = _mul(a, a), n >> 1
    return out


def spectral_radius(a: Matrix) -> float:
    """The largest eigenvalue modulus of a real 2 x 2 matrix (from its trace and determinant)."""
    trace, det = a[0] + a[3], a[0] * a[3] - a[1] * a[2]
    disc = trace * trace - 4.0 * det
    if disc < 0:
        return math.sqrt(det)  # a complex pair: |lambda|^2 = det
    root = math.sqrt(disc)
    return max(abs(trace + root), abs(trace - root)) / 2.0


def repeated_key_map(beta: float, eta: float, keep: float, chunk: int) -> Matrix:
    """One chunk of b = ``chunk`` tokens that all write along the same unit key, as a map of (m, s) at the chunk's
    start to (m, s) at its end (target at 0: the affine shift by the fixed point does not change stability). Every
    token's gradient is taken at the chunk-start value m0: s <- eta s - beta m0, m <- keep m + s. One token is a
    3 x 3 map of (m, s, m0); the chunk is its b-th power (by squaring: a spec's chunk size is not bounded)."""
    step = ((keep, eta, -beta), (0.0, eta, -beta), (0.0, 0.0, 1.0))
    out = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    n = chunk
    while n:
        if n & 1:
            out = _mul3(out, step)
        step, n = _mul3(step, step), n >> 1
    # the chunk starts with m0 = m
    return (out[0][0] + out[0][2], out[0][1], out[1][0] + out[1][2], out[1][1])


def _mul3(a: tuple, b: tuple) -> tuple:
    return tuple(tuple(sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)) for i in range(3))


def _write(beta: float, eta: float, keep: float) -> Matrix:
    """One token writing along the key: s <- eta s - beta m; m <- keep m + s."""
    return (keep - beta, eta, -beta, eta)


def _coast(eta: float, keep: float) -> Matrix:
    """One token writing an orthogonal key: s <- eta s; m <- keep m + s."""
    return (keep, eta, 0.0, eta)


def revisit_map(beta: float, eta: float, keep: float, period: int) -> Matrix:
    """One period of p = ``period`` tokens for a key direction written by the first token only (the other p - 1
    tokens write orthogonal keys, which leave m and s to decay): chunk size 1."""
    return _mul(_power(_coast(eta, keep), period - 1), _write(beta, eta, keep))


def _largest_stable_beta(at0: Matrix, at1: Matrix) -> float:
    """The largest beta >= 0 with spectral radius <= 1 for a map that is ``at0`` at beta = 0 and ``at1`` at beta = 1
    and whose gradient enters through a rank-1 term, so that its trace and determinant are affine in beta. Jury's
    conditions for a 2 x 2 map, det <= 1 and |trace| <= 1 + det, are then three affine inequalities in beta, each
    crossing zero at most once."""
    tr0, det0 = at0[0] + at0[3], at0[0] * at0[3] - at0[1] * at0[2]
    tr1, det1 = at1[0] + at1[3] - tr0, at1[0] * at1[3] - at1[1] * at1[2] - det0
    bound = math.inf
    for const, slope in ((1 - det0, -det1), (1 + tr0 + det0, tr1 + det1), (1 - tr0 + det0, det1 - tr1)):
        if slope < 0:
            bound = min(bound, max(const, 0.0) / -slope)
    return bound


def largest_stable_beta_repeated(eta: float, keep: float, chunk: int) -> float:
    """The largest step beta = 2 theta ||k||^2 at which a key repeated within every chunk stays bounded."""
    return _largest_stable_beta(repeated_key_map(0.0, eta, keep, chunk), repeated_key_map(1.0, eta, keep, chunk))


def largest_stable_beta_revisit(eta: float, keep: float, period: int) -> float:
    """The largest step beta at which a key direction written once every ``period`` tokens stays bounded."""
    return _largest_stable_beta(revisit_map(0.0, eta, keep, period), revisit_map(1.0, eta, keep, period))


def largest_stable_beta_fresh(eta: float, keep: float) -> tuple[float, int]:
    """The largest step at which every revisit period p stays bounded, and the worst p: every p up to
    ``_DENSE_PERIODS``, then doublings (without forgetting the bound falls towards its p -> inf limit 2 (1 - eta),
    reached at float precision by the periods searched)."""
    coast, at0, at1 = _coast(eta, keep), _write(0.0, eta, keep), _write(1.0, eta, keep)
    powers, power = [], (1.0, 0.0, 0.0, 1.0)
    for period in range(1, _DENSE_PERIODS + 1):
        powers.append((period, power))
        power = _mul(power, coast)
    powers += [(_DENSE_PERIODS << i, _power(coast, (_DENSE_PERIODS << i) - 1)) for i in range(1, 29)]
    return min((_largest_stable_beta(_mul(c, at0), _mul(c, at1)), p) for p, c in powers)


def cycle_map(beta: float, eta: float, keep: float, period: int, chunk: int, phase: int = 0) -> Matrix:
    """The general orthogonal pattern: a key direction written by the tokens t = phase (mod ``period``), the other
    tokens writing orthogonal keys, with every gradient taken at its chunk's start (stale by up to b - 1 tokens),
    as a map of (m, s) over lcm(period, chunk) tokens from a chunk start. ``cycle_map(.., 1, b)`` is
    :func:`repeated_key_map` and ``cycle_map(.., p, 1)`` is :func:`revisit_map`; validation uses those two, this one
    checks that no period in between is worse (docs/stability.md section 1.3)."""
    length = period * chunk // math.gcd(period, chunk)
    start = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0))  # m0 <- m at a chunk start
    out = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    for t in range(length):
        if t % chunk == 0:
            out = _mul3(start, out)
        step = -beta if t % period == phase else 0.0
        out = _mul3(((keep, eta, step), (0.0, eta, step), (0.0, 0.0, 1.0)), out)
    return (out[0][0], out[0][1], out[1][0], out[1][1])  # the first chunk start overwrites m0, so its column is 0


def largest_stable_beta_cycle(eta: float, keep: float, period: int, chunk: int, steps: int = 60) -> float:
    """The largest stable beta of :func:`cycle_map` over every phase (a phase shifted by a whole chunk is the same
    product rotated, so ``min(period, chunk)`` phases cover them all), by bisection in log beta: with several
    writes per period the map is a polynomial in beta, no longer affine. Assumes the stable set is an interval."""
    worst = math.inf
    for phase in range(min(period, chunk)):
        lo, hi = 1e-9, 1e3
        for _ in range(steps):
            mid = math.sqrt(lo * hi)
            stable = spectral_radius(cycle_map(mid, eta, keep, period, chunk, phase)) <= 1 + 1e-12
            lo, hi = (mid, hi) if stable else (lo, mid)
        worst = min(worst, lo)
    return worst


@dataclass(frozen=True)
class StableTheta:
    """The largest inner learning rate at which a depth-1 memory (unit keys, squared loss) stays bounded, for each
    key pattern (``repeated``: a key repeated within a chunk; ``fresh``: orthogonal keys revisited every
    ``fresh_period`` tokens, the worst period), and the smaller of the two (``theta``)."""

    repeated: float
    fresh: float
    fresh_period: int

    @property
    def theta(self) -> float:
        return min(self.repeated, self.fresh)


@lru_cache(maxsize=256)
def stable_theta(eta: float, alpha: float, chunk: int) -> StableTheta:
    """The depth-1 stability bounds on theta for momentum decay ``eta`` (0 without momentum), forget rate
    ``alpha`` (0 without forgetting) and chunk size ``chunk``: theta <= bound keeps the spectral radius <= 1."""
    keep = 1.0 - alpha
    fresh, period = largest_stable_beta_fresh(eta, keep)
    return StableTheta(largest_stable_beta_repeated(eta, keep, chunk) / 2.0, fresh / 2.0, period)
