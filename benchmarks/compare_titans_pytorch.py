"""Our memory layer against titans-pytorch's NeuralMemory, at equal sizes, on the CPU: forward and forward+backward.

Ours is the memory layer of the model ``titans_compose.build`` makes of the LMM spec at these sizes (a
``NeuralMemory``, built from its graph node's op), run alone on [batch, T, dim] inputs.

Every configuration runs in a fresh process with 2 threads: one warm-up, then the median of --repeats timed runs,
tokens per second, and the process's peak RSS. Per grid point, --rounds rounds alternate titans-pytorch and ours, and
each speed-up is the median of the per-round ratios, so that drift in the machine's speed between minutes falls on
both sides of a ratio. Prints a table and appends it, with the date and the command, to benchmarks/RESULTS.md; with
matplotlib installed, also plots the speed-ups against the targets (benchmarks/compare_titans_pytorch.png).

--features titans switches off what our module computes and titans-pytorch's default NeuralMemory does not (see
FEATURES), to separate the cost of those features from the memory core's.

titans-pytorch is not a dependency of this project: install it into an environment of its own and point
--titans-python at that interpreter, e.g.

    python -m venv /tmp/tp && /tmp/tp/bin/pip install torch==2.13.0 titans-pytorch==0.5.5
    /tmp/tp/bin/pip install -e .
    python benchmarks/compare_titans_pytorch.py --titans-python /tmp/tp/bin/python

Semantics differ and the table says so: ours takes each chunk's gradients at that chunk's start weights (the
paper's mini-batch GD, sequential across chunks); titans-pytorch 0.5.5 by default takes every chunk's gradients at
the sequence-start weights and combines them with an associative scan.

The last two columns bound what any eager-PyTorch implementation of our semantics can reach here: the memory
core's unavoidable batched matmuls alone (no elementwise work), plus the measured rest of our module.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from record import append_section, pyplot, save_figure

HERE = Path(__file__).resolve().parent
SPEC = HERE.parent / "specs" / "titans_lmm_small.yaml"
TARGETS = {"per_chunk": 2.0, "after": 1.5}  # issue 3's forward+backward speed-up targets at every grid point

BATCH, DIM, HEADS, HEAD_DIM, DEPTH, EXPANSION = 2, 256, 4, 64, 2, 4

# Which of our module's features run. "paper": the spec's NeuralMemory (SiLU q/k/v, causal depthwise conv,
# l2-normalised q/k, per-token gates, RMSNorm on the read). "titans": as near to titans-pytorch 0.5.5's default
# NeuralMemory as our spec says it (no activation, conv or q/k norm on the projections, no read norm; momentum and
# forget gates per chunk where the retrieval allows it); our per-channel output gate stays (theirs is per head).
FEATURES = {
    "paper": [],
    "titans": [
        "projections.conv_kernel=null",
        "projections.activation=identity",
        "projections.qk_l2norm=false",
        "memory.readout_norm=false",
    ],
}
PER_CHUNK_GATES = ["update.momentum.gate=per_chunk", "update.forget.gate=per_chunk"]


def feature_overrides(features: str, retrieval: str) -> list[str]:
    """Spec overrides for a feature set; per-chunk gates only with per-chunk retrieval (otherwise not causal)."""
    chunk_gates = features == "titans" and retrieval == "per_chunk"
    return FEATURES[features] + (PER_CHUNK_GATES if chunk_gates else [])


def plot_path(features: str) -> Path:
    return HERE / ("compare_titans_pytorch.png" if features == "paper" else f"compare_titans_pytorch_{features}.png")


def build_ours(chunk: int, retrieval: str, features: str = "paper"):
    import torch

    from titans_compose.builder import build

    overrides = [
        f"model.dim={DIM}",
        f"memory.heads={HEADS}",
        f"memory.head_dim={HEAD_DIM}",
        f"memory.depth={DEPTH}",
        f"memory.expansion={EXPANSION}",
        f"memory.chunk_size={chunk}",
        f"memory.retrieval={retrieval}",
        "memory.activation=gelu",
        "memory.residual=true",
        "memory.output_norm=true",
        "blocks.0.repeat=1",
        *feature_overrides(features, retrieval),
    ]
    module = build(SPEC, overrides, smoke=False).module.memory_layers()[0][1]
    module.check_finite = True  # the model checks every layer's call too (all at once, per forward)
    return lambda x: module(x)[0], module, torch


def build_titans(chunk: int):
    import torch
    from titans_pytorch import MemoryMLP, NeuralMemory

    module = NeuralMemory(
        dim=DIM,
        chunk_size=chunk,
        heads=HEADS,
        dim_head=HEAD_DIM,
        model=MemoryMLP(HEAD_DIM, depth=DEPTH, expansion_factor=EXPANSION),
    )
    return lambda x: module(x)[0], module, torch


def matmul_floor(cfg, rows: int, seq: int, repeats: int, torch) -> dict:
    """Seconds for the unavoidable matmuls of our memory core over ``seq`` tokens: every forward matmul once
    (forward) and with its two gradient matmuls (forward+backward). No elementwise work: a lower bound."""
    from titans_compose.ops.memory.flops import chunk_matmuls  # our side only: titans-pytorch's worker lacks it

    b = cfg.chunk_size
    shapes = chunk_matmuls(cfg, rows, b)
    tensors = [(torch.randn(r, m, k), torch.randn(r, k, n), torch.randn(r, m, n)) for r, m, k, n in shapes]
    chunks = -(-seq // b)

    def forward() -> None:
        for _ in range(chunks):
            for a, w, _g in tensors:
                torch.bmm(a, w)

    def forward_backward() -> None:
        for _ in range(chunks):
            for a, w, g in tensors:
                torch.bmm(a, w)
                torch.bmm(g, w.transpose(1, 2))
                torch.bmm(a.transpose(1, 2), g)

    return {name: _median_time(step, repeats) for name, step in (("fwd", forward), ("fwd_bwd", forward_backward))}


class _NoMemoryCore:
    """Stands in for the memory scan so that the rest of the module (projections, convolutions, gates, norms,
    output projection) can be timed alone; every input still reaches the output, so every gradient is computed."""

    def __call__(self, q, k, v, theta, log_eta, log_keep, state, cfg):
        y = q + k + v * theta.unsqueeze(-1)
        for gate in (log_eta, log_keep):
            if gate is not None:
                y = y + gate.unsqueeze(-1)
        return y, state


def _median_time(step, repeats: int) -> float:
    step()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def worker(args: argparse.Namespace) -> None:
    """Time one configuration in this process and print one JSON line."""
    if args.impl == "ours":
        fn, module, torch = build_ours(args.chunk, args.retrieval, args.features)
    else:
        fn, module, torch = build_titans(args.chunk)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(BATCH, args.seq, DIM)

    def fwd() -> None:
        with torch.no_grad():
            fn(x)

    def fwd_bwd() -> None:
        module.zero_grad(set_to_none=True)
        fn(x).square().mean().backward()

    timings = {name: _median_time(step, args.repeats) for name, step in (("fwd", fwd), ("fwd_bwd", fwd_bwd))}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.impl == "ours":
        floor = matmul_floor(module.config, BATCH * HEADS, args.seq, args.repeats, torch)
        module.dispatch = _NoMemoryCore()
        rest = {name: _median_time(step, args.repeats) for name, step in (("fwd", fwd), ("fwd_bwd", fwd_bwd))}
        timings.update(floor_fwd=floor["fwd"] + rest["fwd"], floor_fwd_bwd=floor["fwd_bwd"] + rest["fwd_bwd"])
    print(json.dumps({**timings, "peak_rss_mb": peak_mb}))


def run_point(python: str, impl: str, seq: int, chunk: int, retrieval: str, repeats: int, features: str) -> dict:
    cmd = [
        python,
        __file__,
        "--worker",
        "--impl",
        impl,
        "--seq",
        str(seq),
        "--chunk",
        str(chunk),
        "--retrieval",
        retrieval,
        "--repeats",
        str(repeats),
        "--features",
        features,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} seq={seq} chunk={chunk} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, points: list[tuple[int, int]]) -> dict:
    """Every round's timings per (impl, seq, chunk, retrieval). Per grid point, ``--rounds`` rounds each time
    titans-pytorch and then each of our retrievals, one fresh process apiece, so that the two sides of every ratio
    are timed a minute apart at most: this machine's speed drifts by up to 1.6x between minutes."""
    from tqdm import tqdm

    sides = [("titans", "per_chunk")] + [("ours", r) for r in args.retrievals]
    jobs = [(s, c, impl, r) for s, c in points for _ in range(args.rounds) for impl, r in sides]
    runs: dict = {}
    for s, c, impl, r in tqdm(jobs, desc="configurations", unit="config"):
        python = args.titans_python if impl == "titans" else sys.executable
        runs.setdefault((impl, s, c, r), []).append(run_point(python, impl, s, c, r, args.repeats, args.features))
    return runs


def summarise(runs: dict, seq: int, chunk: int, retrieval: str) -> dict:
    """Medians over rounds of each side's times, and the median and range over rounds of the per-round speed-ups
    (titans-pytorch's time over ours, both from the same round)."""
    ours, theirs = runs[("ours", seq, chunk, retrieval)], runs[("titans", seq, chunk, "per_chunk")]

    def median(side: list[dict], key: str) -> float:
        return statistics.median(run[key] for run in side)

    def ratios(key: str, base: str) -> list[float]:
        return [t[key] / o[base] for t, o in zip(theirs, ours, strict=True)]

    fwd_bwd = ratios("fwd_bwd", "fwd_bwd")
    return {
        "ours_fwd_bwd": median(ours, "fwd_bwd"),
        "titans_fwd_bwd": median(theirs, "fwd_bwd"),
        "speedup_fwd_bwd": statistics.median(fwd_bwd),
        "speedup_range": (min(fwd_bwd), max(fwd_bwd)),
        "ours_fwd": median(ours, "fwd"),
        "titans_fwd": median(theirs, "fwd"),
        "speedup_fwd": statistics.median(ratios("fwd", "fwd")),
        "ours_rss": max(run["peak_rss_mb"] for run in ours),
        "titans_rss": max(run["peak_rss_mb"] for run in theirs),
        "floor_fwd_bwd": median(ours, "floor_fwd_bwd"),
        "speedup_at_floor": statistics.median(ratios("fwd_bwd", "floor_fwd_bwd")),
    }


def table(summaries: dict, points: list[tuple[int, int]], retrievals: list[str]) -> str:
    header = (
        "| seq | chunk | ours retrieval | ours fwd+bwd ms | titans fwd+bwd ms | speed-up fwd+bwd | over rounds "
        "| ours fwd ms | titans fwd ms | speed-up fwd | ours tok/s fwd+bwd | titans tok/s fwd+bwd | ours peak RSS MB "
        "| titans peak RSS MB | ours floor fwd+bwd ms | speed-up at floor |"
    )
    lines = [header, "|" + "|".join(["---"] * 16) + "|"]
    for s, c in points:
        for r in retrievals:
            m = summaries[(s, c, r)]
            low, high = m["speedup_range"]
            lines.append(
                f"| {s} | {c} | {r} | {m['ours_fwd_bwd'] * 1e3:.0f} | {m['titans_fwd_bwd'] * 1e3:.0f} "
                f"| {m['speedup_fwd_bwd']:.2f}x | {low:.2f}-{high:.2f}x | {m['ours_fwd'] * 1e3:.0f} "
                f"| {m['titans_fwd'] * 1e3:.0f} | {m['speedup_fwd']:.2f}x | {BATCH * s / m['ours_fwd_bwd']:.0f} "
                f"| {BATCH * s / m['titans_fwd_bwd']:.0f} | {m['ours_rss']:.0f} | {m['titans_rss']:.0f} "
                f"| {m['floor_fwd_bwd'] * 1e3:.0f} | {m['speedup_at_floor']:.2f}x |"
            )
    return "\n".join(lines)


def plot(summaries: dict, points: list[tuple[int, int]], retrievals: list[str], features: str) -> str:
    """Forward+backward speed-up over titans-pytorch per grid point (bars: median over rounds, whiskers: the range),
    the speed-up our matmul floor would give (markers) and each retrieval's target (dashed)."""
    plt = pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / len(retrievals)
    for j, r in enumerate(retrievals):
        xs = [i + (j - (len(retrievals) - 1) / 2) * width for i in range(len(points))]
        rows = [summaries[(s, c, r)] for s, c in points]
        mid = [m["speedup_fwd_bwd"] for m in rows]
        spread = [[x - m["speedup_range"][0] for x, m in zip(mid, rows, strict=True)],
                  [m["speedup_range"][1] - x for x, m in zip(mid, rows, strict=True)]]  # fmt: skip
        bars = ax.bar(xs, mid, width, yerr=spread, capsize=3, label=f"ours, {r}")
        color = bars.patches[0].get_facecolor()
        ax.scatter(xs, [m["speedup_at_floor"] for m in rows], marker="_", s=300, color=color,
                   label=f"at our matmul floor, {r}")  # fmt: skip
        if r in TARGETS:
            ax.axhline(TARGETS[r], color=color, linestyle="--", linewidth=1, label=f"target, {r} ({TARGETS[r]}x)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(points)), [f"seq {s}\nchunk {c}" for s, c in points])
    ax.set(ylabel="speed-up over titans-pytorch 0.5.5\n(forward+backward)", yscale="log")
    ax.set_title(f"NeuralMemory ({features} features) vs titans-pytorch on the CPU (2 threads)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, plot_path(features))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--titans-python",
        default=os.environ.get("TITANS_PYTORCH_PYTHON"),
        help="interpreter of an environment with titans-pytorch==0.5.5 and titans_compose installed",
    )
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--retrievals", nargs="+", default=["per_chunk", "after"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per process (the median is kept)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh-process rounds per grid point, sides alternating")
    parser.add_argument(
        "--features",
        choices=sorted(FEATURES),
        default="paper",
        help="our module as the spec builds it (paper) or with titans-pytorch's feature set (titans)",
    )
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["ours", "titans"], help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--retrieval", default="after", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.titans_python:
        parser.error("give --titans-python (or TITANS_PYTORCH_PYTHON): see the module docstring for the set-up")
    points = [(s, c) for s in args.seqs for c in args.chunks]
    runs = measure(args, points)
    summaries = {(s, c, r): summarise(runs, s, c, r) for s, c in points for r in args.retrievals}
    text = table(summaries, points, args.retrievals)
    print(text)
    if args.no_record:
        return
    import torch

    body = (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"2 threads, each configuration in a fresh process, median of {args.repeats} runs after one warm-up; "
        f"{args.rounds} rounds per grid point, titans-pytorch and ours alternating; times are medians over rounds, "
        "speed-ups the median (and range) of the per-round ratios.  \n"
        f"Sizes: batch {BATCH}, width {DIM}, {HEADS} heads x {HEAD_DIM}, memory depth {DEPTH}, expansion "
        f"{EXPANSION}, GELU, residual + LayerNorm memory on both sides.  \n"
        f"Our features: {args.features} (spec overrides for `per_chunk`: "
        f"{', '.join(feature_overrides(args.features, 'per_chunk')) or 'none'}).  \n"
        "Semantics: ours takes each chunk's gradients at that chunk's start weights (sequential across chunks, "
        "the paper's mini-batch GD) and reads per token (`after`) or at chunk start (`per_chunk`); titans-pytorch "
        "takes all gradients at the sequence-start weights (its default) and reads per chunk.  \n"
        "Floor: the unavoidable batched matmuls of our memory core (each forward matmul and its two gradient "
        "matmuls, nothing elementwise) plus the measured rest of our module (projections, convolutions, gates, "
        "norms) with the memory scan stubbed out: a lower bound on our time in eager PyTorch on this machine.\n\n"
        f"{text}"
    )
    title = "NeuralMemory vs titans-pytorch 0.5.5 on the CPU"
    append_section(title if args.features == "paper" else f"{title}, titans-pytorch's features", __file__, body)
    print(plot(summaries, points, args.retrievals, args.features))


if __name__ == "__main__":
    main()
