"""Does the long-term memory help language modelling beyond the window? MAC, MAG, MAL and LMM against sliding-window
attention alone, on held-out text, with sequences 16x the attention window.

Every variant is the pass-key benchmark's tiny model (benchmarks/long_context.py: width 64, 2 layers, window 16,
memory 2 heads x 32 of depth 2), trained on the same batches of bytes (the Python standard library's source, or
``--data``) for the same number of steps, so every variant sees the same tokens. Two baselines: ``SWA``, the same
two layers without memory, and ``SWA-matched``, four layers of it, with as many parameters as the largest memory
variant (0.6% fewer than MAC, 11% more than MAG and MAL, 32% more than LMM), so a memory variant that beats it
does not do so by being larger. Validation bits per byte are measured on held-out files every ``--eval-every``
steps and at the end (on ``--val-batches`` batches), for every seed. At the end they are also split by how far into
the sequence the predicted byte lies (``SPANS``: within the first window, then 1-2, 2-4, 4-8 and 8-16 windows in),
which shows where a memory's gain or loss comes from: two layers of attention see about 2 windows back, four about
4, so what a model gains beyond that is the memory's.

Prints the tables (per seed, the mean over seeds with the difference from the matched baseline, and bits per byte
by position); unless ``--no-record``, writes benchmarks/language_model.png (needs matplotlib) and appends the tables
to RESULTS.md.

    python benchmarks/language_model.py                            # the recorded run: 2 seeds, 1000 steps
    python benchmarks/language_model.py --steps 20 --eval-every 10 --val-batches 2 --seeds 0 --no-record
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from long_context import VARIANTS, WINDOW, validation_bits_per_byte
from record import append_section, pyplot, save_figure

from titans_compose.builder import build
from titans_compose.train.data import WindowSampler, load_corpus
from titans_compose.train.loop import batch_logits, train

HERE = Path(__file__).resolve().parent
SPECS = HERE.parent / "specs"
PLOT = HERE / "language_model.png"
MATCHED = "SWA-matched"
#: name -> (spec, overrides): the pass-key benchmark's sizes, and the baseline as large as the largest of them
MODELS: dict[str, tuple[str, list[str]]] = {
    **{name: VARIANTS[name] for name in ("MAC", "MAG", "MAL", "LMM", "SWA")},
    MATCHED: (VARIANTS["SWA"][0], [*VARIANTS["SWA"][1], "blocks.0.repeat=4"]),
}
#: positions of the predicted bytes, in windows from the start of the sequence: [start, stop) in bytes
SPANS = [(1, WINDOW), *((k * WINDOW, 2 * k * WINDOW) for k in (1, 2, 4, 8))]
#: the spans as the table and the plot name them: the positions of the bytes, first and last
SPAN_NAMES = [f"{start}-{stop - 1}" for start, stop in SPANS]


def bits_by_position(model: torch.nn.Module, val: WindowSampler, batches: int) -> list[float]:
    """Held-out bits per byte of the bytes at positions in each of ``SPANS``, over batches 1..``batches`` of ``val``
    (the batches :func:`validation_bits_per_byte` scores): where in the sequence a model predicts well."""
    model.eval()
    total = torch.zeros(val.seq_len - 1, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for i in range(1, batches + 1):
            batch = val(i)
            logits = batch_logits(model, batch)[:, :-1].float()
            targets = batch.tokens[:, 1:]
            total += F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double().sum(0)
            count += targets.shape[0]
    per_byte = total / count / math.log(2)  # per_byte[p - 1]: the byte at position p
    return [float(per_byte[start - 1 : stop - 1].mean()) for start, stop in SPANS]


def run(name: str, seed: int, args: argparse.Namespace) -> dict:
    """Train ``name`` with ``seed`` and return its parameter count, minutes, validation curve and final bits/byte."""
    torch.set_num_threads(args.threads)
    spec, overrides = MODELS[name]
    torch.manual_seed(seed)
    model = build(SPECS / spec, [*overrides, *args.set], seed=seed, smoke=False).module
    corpus = load_corpus(args.data, max_bytes=args.max_bytes)
    # the same batches for every variant: the data's seed is fixed, the model's seed varies
    sampler = WindowSampler(corpus.train, args.batch, args.seq_len, seed=1000 + seed)
    val = WindowSampler(corpus.val, args.batch, args.seq_len, seed=0, stream="val")
    started = time.perf_counter()
    result = train(
        model,
        sampler,
        steps=args.steps,
        lr=args.lr,
        warmup=args.steps // 10,
        eval_every=args.eval_every,
        eval_fn=lambda m: {"val_bpb": validation_bits_per_byte(m, val, max(1, args.val_batches // 4))},
        progress=args.jobs == 1,
    )
    minutes = (time.perf_counter() - started) / 60
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "minutes": minutes,
        "curve": [(step, metrics["val_bpb"]) for step, metrics in result.evals],
        "val_bpb": validation_bits_per_byte(model, val, args.val_batches),
        "by_position": bits_by_position(model, val, args.val_batches),
        "train_loss": statistics.fmean(r.loss for r in result.history[-20:]) / math.log(2),
    }


def tables(results: dict[tuple[str, int], dict], names: list[str], seeds: list[int]) -> str:
    """Per-run rows, then per-variant means over seeds with the difference from the matched baseline."""
    rows = ["| variant | seed | parameters | train min | train bits/byte (last 20) | val bits/byte |", "|---" * 6 + "|"]
    for (name, seed), r in results.items():
        rows.append(
            f"| {name} | {seed} | {r['params']:,} | {r['minutes']:.1f} | {r['train_loss']:.3f} | {r['val_bpb']:.3f} |"
        )
    mean = {name: statistics.fmean(results[name, s]["val_bpb"] for s in seeds) for name in names}
    summary = [
        "| variant | mean val bits/byte | vs SWA-matched | lower than SWA-matched in every seed |",
        "|---" * 4 + "|",
    ]
    for name in names:
        if MATCHED in names and name != MATCHED:
            every = all(results[name, s]["val_bpb"] < results[MATCHED, s]["val_bpb"] for s in seeds)
            summary.append(
                f"| {name} | {mean[name]:.3f} | {mean[name] - mean[MATCHED]:+.3f} | {'yes' if every else 'no'} |"
            )
        else:
            summary.append(f"| {name} | {mean[name]:.3f} | | |")
    return "\n".join(rows) + "\n\n" + "\n".join(summary) + "\n\n" + position_table(results)


def position_table(results: dict[tuple[str, int], dict]) -> str:
    """Held-out bits per byte of each run by the predicted byte's position (``SPANS``)."""
    rows = ["| variant | seed | " + " | ".join(f"bytes {name}" for name in SPAN_NAMES) + " |"]
    rows.append("|---" * (2 + len(SPANS)) + "|")
    for (name, seed), r in results.items():
        rows.append(f"| {name} | {seed} | " + " | ".join(f"{bpb:.3f}" for bpb in r["by_position"]) + " |")
    return "\n".join(rows)


def plot(results: dict[tuple[str, int], dict]) -> str:
    """Validation bits per byte over training (left) and, at the end, by position in the sequence (right, the mean
    over seeds)."""
    plt = pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    fig, (curves, positions) = plt.subplots(1, 2, figsize=(12, 4))
    colours: dict[str, str] = {}
    first_seed = min(s for _, s in results)
    for (name, seed), r in results.items():
        steps, bpb = zip(*r["curve"], strict=True)
        (line,) = curves.plot(steps, bpb, color=colours.get(name), linestyle="-" if seed == first_seed else "--")
        if name not in colours:
            colours[name] = line.get_color()
            line.set_label(name)
    curves.set(xlabel="training step", ylabel="validation bits/byte", title="held-out bytes, sequences 16x the window")
    for name, colour in colours.items():
        runs = [r["by_position"] for (n, _), r in results.items() if n == name]
        mean = [statistics.fmean(span) for span in zip(*runs, strict=True)]
        positions.plot(SPAN_NAMES, mean, "o-", color=colour, label=name)
    positions.set(
        xlabel=f"position of the predicted byte (the window is {WINDOW})",
        ylabel="validation bits/byte",
        title="at the end, by position (mean over seeds)",
    )
    for ax in (curves, positions):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, PLOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=16 * WINDOW, help="training and validation sequence length")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--val-batches", type=int, default=32, help="held-out batches of the final evaluation")
    parser.add_argument("--data", type=Path, help="a text file or directory (default: the standard library's source)")
    parser.add_argument("--max-bytes", type=int, default=8_000_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, each in its own process")
    parser.add_argument(
        "--set", action="append", default=[], metavar="PATH=VALUE", help="a spec override for every run"
    )
    parser.add_argument("--no-record", action="store_true", help="do not write the plot or append to RESULTS.md")
    args = parser.parse_args()
    if args.seq_len < 16 * WINDOW:
        parser.error(f"--seq-len must be at least 16x the attention window ({16 * WINDOW})")
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    points = [(name, seed) for seed in args.seeds for name in args.variants]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {point: pool.submit(run, *point, args) for point in points}
        results = {point: f.result() for point, f in tqdm(futures.items(), desc="runs", unit="run")}
    table = tables(results, args.variants, args.seeds)
    print(table)
    if args.no_record:
        return
    print(plot(results))
    body = (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.jobs} runs at once "
        f"with {args.threads} thread(s) each.  \n"
        f"Models: the pass-key benchmark's (width 64, 2 layers, window {WINDOW}, memory 2 heads x 32, depth 2, chunk "
        f"8); {MATCHED}: 4 layers without memory. {args.steps} steps of {args.batch} x {args.seq_len} bytes "
        f"({args.seq_len // WINDOW}x the window), lr {args.lr}, the same batches for every variant of a seed; "
        f"validation on {args.val_batches} x {args.batch} held-out windows.\n\n{table}"
    )
    append_section("Language modelling beyond the window", __file__, body)


if __name__ == "__main__":
    main()
