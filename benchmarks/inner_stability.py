"""Where does the inner update diverge, and how does the outer gradient grow with the sequence length?

Runs the project's sequential reference recurrence (``ops.memory.reference.reference_memory``) in float64 and
compares it with the depth-1 analysis of ``titans_compose.spec.stability`` (docs/stability.md):

1. depth 1: the largest stable theta found by bisection on the reference, for a key repeated on every token and for
   random unit keys, against the analytic bounds (repeated key within a chunk; orthogonal keys revisited every p);
2. depth 2 (hidden 4d, SiLU), with and without the residual and the output LayerNorm: max |y| and the weight growth
   over a long sequence on a theta grid (no analysis is exact there);
3. the outer gradient: the norm of d loss / d v_1 (the first token's value) for a loss on the last chunk's outputs,
   against the sequence length, inside and outside the region.

    python benchmarks/inner_stability.py                # the recorded run (a few minutes on one thread)
    python benchmarks/inner_stability.py --no-record --quick

Prints the tables, appends them with the date and the command to benchmarks/RESULTS.md, and writes
benchmarks/inner_stability.png when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from record import append_section, pyplot, save_figure

from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.ops.memory.reference import reference_memory
from titans_compose.ops.memory.state import MemoryState
from titans_compose.registry.rules import ACTIVATIONS, LOSSES, OPTIMIZERS, RETENTIONS
from titans_compose.spec.stability import largest_stable_beta_cycle, largest_stable_beta_revisit, stable_theta

F64 = torch.float64
HERE = Path(__file__).resolve().parent
#: the memory output's last layer forms: (residual, output_norm)
FORMS = {"f(x)": (False, False), "x + f(x)": (True, False), "LN(f(x))": (False, True), "x + LN(f(x))": (True, True)}


def config(
    depth: int, d: int, chunk: int, residual: bool = False, output_norm: bool = False, forget: bool = True
) -> MemoryConfig:
    """A memory of ``depth`` layers (hidden width 4d, SiLU) with the l2 loss, momentum and (with ``forget``) the
    decay forget rule."""
    shapes = [(d, d)] if depth == 1 else [(4 * d, d)] + [(4 * d, 4 * d)] * (depth - 2) + [(d, 4 * d)]
    return MemoryConfig(
        layer_shapes=tuple(shapes),
        activation=ACTIVATIONS["silu"][0],
        loss=LOSSES["l2"][0],
        retention=RETENTIONS["decay"][0],
        optimizer=OPTIMIZERS["momentum"][0],
        residual=residual,
        output_norm=output_norm,
        chunk_size=chunk,
        forget=forget,
    )


@dataclass(frozen=True)
class Stream:
    """Keys, values and the initial weights of ``rows`` independent memories (seeded)."""

    k: torch.Tensor
    v: torch.Tensor
    weights: tuple[torch.Tensor, ...]

    @staticmethod
    def make(cfg: MemoryConfig, length: int, keys: str, rows: int, seed: int, targets: bool = True) -> Stream:
        """``keys``: ``random`` (independent unit keys), ``repeated`` (one unit key per row on every token) or
        ``similar`` (unit keys around a shared direction, mean cosine about 0.7, like MAC's attention outputs).
        Values are standard normal per feature (the LayerNorm's output scale), or zero without ``targets``."""
        gen = torch.Generator().manual_seed(seed)
        d = cfg.head_dim
        noise = torch.randn(rows, length, d, dtype=F64, generator=gen)
        if keys == "repeated":
            noise = noise[:, :1].expand(rows, length, d)
        elif keys == "similar":
            noise = 0.65 * noise + torch.randn(rows, 1, d, dtype=F64, generator=gen) * math.sqrt(d)
        elif keys != "random":
            raise ValueError(f"unknown key pattern {keys!r}")
        k = torch.nn.functional.normalize(noise, dim=-1).contiguous()
        v = torch.randn(rows, length, d, dtype=F64, generator=gen) if targets else torch.zeros_like(k)
        weights = tuple(torch.randn(rows, o, i, dtype=F64, generator=gen) / math.sqrt(i) for o, i in cfg.layer_shapes)
        return Stream(k, v, weights)

    @staticmethod
    def cycle(cfg: MemoryConfig, length: int, rows: int, seed: int) -> Stream:
        """Keys cycling through an orthonormal basis of the head width (one per row), zero targets: every direction
        is written once per ``head_dim`` tokens, at its own phase."""
        gen = torch.Generator().manual_seed(seed)
        d = cfg.head_dim
        basis = torch.linalg.qr(torch.randn(rows, d, d, dtype=F64, generator=gen))[0].transpose(1, 2)
        k = basis.repeat(1, -(-length // d), 1)[:, :length].contiguous()
        weights = tuple(torch.randn(rows, o, i, dtype=F64, generator=gen) / math.sqrt(i) for o, i in cfg.layer_shapes)
        return Stream(k, torch.zeros_like(k), weights)

    def run(self, cfg: MemoryConfig, theta: float, eta: float, alpha: float) -> tuple[torch.Tensor, MemoryState]:
        """The reference over every token with constant gates, from the initial weights and zero momentum."""
        return self._run(cfg, theta, eta, alpha, MemoryState.initial(self.weights, True), 0, None)

    def halves(self, cfg: MemoryConfig, theta: float, eta: float, alpha: float) -> tuple[float, float, float, float]:
        """Weight norms (mean over rows of the summed layers' Frobenius norms) at the start, halfway and the end,
        and max |y| over the run."""
        half = self.k.shape[1] // 2
        y1, mid = self._run(cfg, theta, eta, alpha, MemoryState.initial(self.weights, True), 0, half)
        y2, end = self._run(cfg, theta, eta, alpha, mid, half, None)
        peak = float(torch.cat([y1, y2], 1).abs().nan_to_num(math.inf).max())
        return norm(self.weights), norm(mid.weights), norm(end.weights), peak

    def _run(
        self,
        cfg: MemoryConfig,
        theta: float,
        eta: float,
        alpha: float,
        state: MemoryState,
        start: int,
        stop: int | None,
    ) -> tuple[torch.Tensor, MemoryState]:
        k, v = self.k[:, start:stop], self.v[:, start:stop]
        full = torch.ones(k.shape[:2], dtype=F64)
        log_eta = (math.log(eta) if eta > 0 else -math.inf) * full  # eta = 0: exp(-inf) = 0, no momentum carried
        log_keep = math.log1p(-alpha) * full if cfg.forget else None
        return reference_memory(k, k, v, theta * full, log_eta, log_keep, state, cfg)


def norm(weights: tuple[torch.Tensor, ...]) -> float:
    value = sum(w.square().sum((-1, -2)) for w in weights).sqrt().mean()
    return float(value.nan_to_num(math.inf))


def diverges(stream: Stream, cfg: MemoryConfig, theta: float, eta: float, alpha: float) -> bool:
    """Whether the weights grow by more than 2x over the second half of the run (a per-token growth rate above
    log 2 / (T / 2): the bisection's edge sits that far outside the exact region), or overflow."""
    _, mid, end, _ = stream.halves(cfg, theta, eta, alpha)
    return not (math.isfinite(end) and end <= 2 * mid)


def bisect_theta(
    stream: Stream, cfg: MemoryConfig, eta: float, alpha: float, lo: float, hi: float, steps: int
) -> float:
    """The largest stable theta by bisection in log space between ``lo`` (stable) and ``hi`` (diverges)."""
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if diverges(stream, cfg, mid, eta, alpha) else (mid, hi)
    return math.sqrt(lo * hi)


def depth1_table(args: argparse.Namespace) -> tuple[str, list[dict]]:
    """Measured largest stable theta of a matrix memory against the analytic bounds."""
    rows, points = [], []
    d, alpha = args.width, 0.0
    for chunk in args.chunks:
        cfg = config(1, d, chunk, forget=False)
        for eta in args.etas:
            bound = stable_theta(eta, alpha, chunk)
            measured = {}
            for keys in ("repeated", "random"):
                stream = Stream.make(cfg, args.length, keys, args.rows, seed=0, targets=False)
                measured[keys] = bisect_theta(stream, cfg, eta, alpha, 1e-4, 10.0, args.bisect)
            period = largest_stable_beta_revisit(eta, 1 - alpha, d) / 2
            rows.append(
                f"| {chunk} | {eta:g} | {bound.repeated:.4g} | {measured['repeated']:.4g} | {bound.fresh:.4g} | "
                f"{period:.4g} | {measured['random']:.4g} |"
            )
            points.append(
                {"chunk": chunk, "eta": eta, **measured, "repeated_bound": bound.repeated, "fresh": bound.fresh}
            )
    head = (
        "| chunk b | eta | repeated key: analytic | measured | fresh keys: analytic (p -> inf) | period p = d | "
        "random keys: measured |\n|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(rows), points


def cycle_table(args: argparse.Namespace) -> str:
    """Orthogonal keys revisiting each direction every p tokens, in chunks of 16: the exact bound of the cycle map
    (stale chunk gradients) against the reference, and the same period with chunk 1."""
    lines = [
        "| period p | cycle map, b = 16 | measured, b = 16 | revisit map, b = 1 |",
        "|---|---|---|---|",
    ]
    eta, chunk = 0.9, 16
    for period in args.periods:
        cfg = config(1, period, chunk, forget=False)
        stream = Stream.cycle(cfg, args.length, args.rows, seed=4)
        measured = bisect_theta(stream, cfg, eta, 0.0, 1e-4, 10.0, args.bisect)
        exact = largest_stable_beta_cycle(eta, 1.0, period, chunk) / 2
        lines.append(
            f"| {period} | {exact:.4g} | {measured:.4g} | {largest_stable_beta_revisit(eta, 1.0, period) / 2:.4g} |"
        )
    return "\n".join(lines)


def deep_table(args: argparse.Namespace) -> str:
    """Depth-2 memories of every output form on a theta grid: max |y|, the weight growth W_T / W_0 and over the
    second half W_T / W_{T/2} (2^a for a power law t^a, astronomically more for a geometric growth)."""
    lines = []
    header = "| form | keys | eta | " + " | ".join(f"theta {t:g}" for t in args.thetas) + " |"
    lines += [header, "|" + "---|" * (3 + len(args.thetas))]
    d, chunk, alpha = args.deep_width, 16, 1 - 2 ** (-1 / 2048)
    for form, (residual, output_norm) in FORMS.items():
        cfg = config(2, d, chunk, residual, output_norm)
        for keys in ("random", "repeated"):
            stream = Stream.make(cfg, args.length, keys, args.rows, seed=1)
            for eta in (0.0, 0.9):
                cells = []
                for theta in args.thetas:
                    start, mid, end, peak = stream.halves(cfg, theta, eta, alpha)
                    cells.append(f"{peak:.2g} / x{end / start:.2g} / x{end / mid:.2g}")
                lines.append(f"| {form} | {keys} | {eta:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: outer-gradient settings: name -> (depth, form, chunk, theta, eta, keys)
GRADIENT_SETTINGS = {
    "depth 1, theta 0.05, eta 0.9, b 1 (inside)": (1, "f(x)", 1, 0.05, 0.9, "random"),
    "depth 1, theta 0.09, eta 0.9, b 1 (near the edge)": (1, "f(x)", 1, 0.09, 0.9, "random"),
    "depth 1, theta 0.3, eta 0.9, b 1 (outside)": (1, "f(x)", 1, 0.3, 0.9, "random"),
    "depth 2 x + LN, theta 0.1, eta 0.9, b 16, random keys": (2, "x + LN(f(x))", 16, 0.1, 0.9, "random"),
    "depth 2 x + LN, theta 0.1, eta 0.9, b 16, similar keys": (2, "x + LN(f(x))", 16, 0.1, 0.9, "similar"),
    "depth 2 x + LN, theta 0.5, eta 0.9, b 16, similar keys": (2, "x + LN(f(x))", 16, 0.5, 0.9, "similar"),
    "depth 2 x + LN, theta 0.1, no momentum, b 16, similar keys": (2, "x + LN(f(x))", 16, 0.1, 0.0, "similar"),
}


def first_token_gradient(setting: tuple, length: int, args: argparse.Namespace) -> tuple[float, float]:
    """|| d loss / d v_1 || and || d loss / d k_1 || for loss = sum over the last 16 tokens of <y_t, u_t> (u fixed
    random unit vectors), mean over rows: how much the end of the sequence depends on the first token's write,
    through the memory state (the first token's query only reads y_1, which the loss does not see)."""
    depth, form, chunk, theta, eta, keys = setting
    cfg = config(depth, args.deep_width if depth > 1 else args.width, chunk, *FORMS[form])
    stream = Stream.make(cfg, length, keys, args.rows, seed=2)
    k, v = stream.k.clone().requires_grad_(), stream.v.clone().requires_grad_()
    y, _ = Stream(k, v, stream.weights).run(cfg, theta, eta, 1 - 2 ** (-1 / 2048))
    gen = torch.Generator().manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(y[:, -16:].shape, dtype=F64, generator=gen), dim=-1)
    g_k, g_v = torch.autograd.grad((y[:, -16:] * u).sum(), (k, v))
    return float(g_v[:, 0].norm(dim=-1).mean()), float(g_k[:, 0].norm(dim=-1).mean())


def gradient_table(args: argparse.Namespace) -> tuple[str, dict[str, list[float]]]:
    """The first token's value and key gradients against the length; the curves of the value gradient."""
    cells = {name: [first_token_gradient(s, n, args) for n in args.lengths] for name, s in GRADIENT_SETTINGS.items()}
    lines = [
        "| setting | " + " | ".join(f"T = {n}" for n in args.lengths) + " |",
        "|" + "---|" * (1 + len(args.lengths)),
    ]
    lines += [f"| {name} | " + " | ".join(f"{gv:.3g} / {gk:.3g}" for gv, gk in gs) + " |" for name, gs in cells.items()]
    return "\n".join(lines), {name: [gv for gv, _ in gs] for name, gs in cells.items()}


def issue_example(args: argparse.Namespace) -> str:
    """The issue's rule: depth 1, eta 0.9, theta 0.3, random unit keys of width 64, chunk 1, no forgetting."""
    cfg = config(1, 64, 1, forget=False)
    stream = Stream.make(cfg, 4096, "random", 1, seed=0)
    y, _ = stream.run(cfg, 0.3, 0.9, 0.0)
    peaks = [float(y[:, :n].abs().max()) for n in (256, 1024, 4096)]
    bound = stable_theta(0.9, 0.0, 1)
    return (
        f"The issue's rule (depth 1, eta 0.9, theta 0.3, random unit keys, d 64, chunk 1, float64): max |y| "
        f"{peaks[0]:.2g} by token 256, {peaks[1]:.2g} by 1024, {peaks[2]:.2g} by 4096; analytic bound theta <= "
        f"{bound.theta:.3g} (fresh keys; a repeated key would allow {bound.repeated:.3g})."
    )


def plot(points: list[dict], curves: dict[str, list[float]], args: argparse.Namespace) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    etas = [i / 200 for i in range(0, 199)]
    for chunk in args.chunks:
        left.plot(
            etas, [stable_theta(e, 0.0, chunk).repeated for e in etas], label=f"analytic, repeated key, b={chunk}"
        )
    left.plot(etas, [stable_theta(e, 0.0, 1).fresh for e in etas], "k--", label="analytic, fresh keys (any b)")
    for chunk, marker in zip(args.chunks, "os^", strict=False):
        ours = [p for p in points if p["chunk"] == chunk]
        left.scatter(
            [p["eta"] for p in ours],
            [p["repeated"] for p in ours],
            marker=marker,
            label=f"measured, repeated, b={chunk}",
        )
        left.scatter(
            [p["eta"] for p in ours],
            [p["random"] for p in ours],
            marker=marker,
            facecolors="none",
            edgecolors="k",
            label=f"measured, random keys, b={chunk}",
        )
    left.set(
        yscale="log", xlabel="momentum eta", ylabel="largest stable theta", title="Depth-1 memory: stability region"
    )
    left.legend(fontsize=7)
    for name, values in curves.items():
        right.plot(args.lengths, values, marker="o", label=name)
    right.set(
        xscale="log",
        yscale="log",
        xlabel="sequence length T",
        ylabel="|| d loss(last chunk) / d v_1 ||",
        title="Outer gradient through the memory state",
    )
    right.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, HERE / "inner_stability.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short sequences and few points (a smoke run)")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.width, args.deep_width, args.rows = 64, 16, 4
    args.chunks, args.etas = [1, 16], [0.0, 0.5, 0.9, 0.97]
    args.length, args.bisect = 2048, 12
    args.thetas = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    args.lengths = [64, 128, 256, 512, 1024, 2048]
    args.periods = [1, 2, 4, 8, 16, 32, 64]
    if args.quick:
        args.etas, args.length, args.bisect, args.thetas, args.lengths = [0.9], 256, 4, [0.1, 1.0], [64, 128]
        args.periods = [1, 16]
    started = time.time()
    issue = issue_example(args)
    print(issue)
    region, points = depth1_table(args)
    print(region)
    cycles = cycle_table(args)
    print(cycles)
    deep = deep_table(args)
    print(deep)
    gradients, curves = gradient_table(args)
    print(gradients)
    figure = plot(points, curves, args)
    print(f"{time.time() - started:.0f} s")
    if args.no_record:
        return
    body = (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s), "
        f"{time.time() - started:.0f} s. Float64, the sequential reference recurrence, l2 loss, unit keys. "
        f"Depth 1: width {args.width}, {args.rows} rows, {args.length} tokens, zero targets (the recurrence is then "
        f"linear), no forgetting; 'measured' is the largest theta whose weights grow less than 2x over the second "
        f"half of the run ({args.bisect} bisection steps in log theta); the cycle table: momentum 0.9, width p, "
        f"chunk 16, keys cycling through an orthonormal basis, the same criterion. Depth 2: width "
        f"{args.deep_width}, hidden 4x, SiLU, chunk 16, forget half-life 2048, standard normal targets, "
        f"{args.length} tokens; each cell is "
        f"max |y| / x(weight norm at the end / at the start) / x(at the end / halfway), mean over {args.rows} rows. "
        f"Outer gradient: || d loss / d v_1 || / || d loss / d k_1 || with loss = sum of <y_t, u_t> over the last "
        f"16 tokens, forget half-life 2048.\n\n"
        f"{issue}\n\n{region}\n\n{cycles}\n\n{deep}\n\n{gradients}" + (f"\n\n{figure}" if figure else "")
    )
    append_section("Inner-update stability and the outer gradient", __file__, body)


if __name__ == "__main__":
    main()
