"""How large is the outer training gradient of a freshly built model, per variant and inner update rule?

A model whose memory is trained while it reads is a recurrent network through its memory state: the outer
gradient reaches early tokens through every later inner step. When that recurrence expands, the gradient norm at
initialisation is orders of magnitude above the usual and spikes on single sequences; clipping the total norm (as
the training loop does) then hands the optimiser the direction of the spike. This script measures it: for every
shipped variant and for the inner-rule settings given (the paper's momentum form and the EMA form, with and without
a clip, theta scaled by the head dimension), the total gradient norm of the pass-key answer loss at
initialisation, over several model seeds and batches, and the largest single-sequence norm of one batch, next to
the sliding-window-only baseline of the same size (issue 17's target: a memory variant's median at most 10x it).

    python benchmarks/outer_gradients.py                  # the recorded run (shipped spec sizes)
    python benchmarks/outer_gradients.py --no-record --seeds 2
    python benchmarks/outer_gradients.py --no-record --spec my_model.yaml      # your own spec

Prints a table and appends it, with the date and the command, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

import torch
from record import append_section
from tqdm import tqdm

from titans_compose.builder import build
from titans_compose.train.loop import next_token_loss
from titans_compose.train.tasks import TaskBatch, passkey_batch

HERE = Path(__file__).resolve().parent
SPECS = HERE.parent / "specs"
VARIANTS = {
    "MAC": "titans_mac_small.yaml",
    "MAG": "titans_mag_small.yaml",
    "MAL": "titans_mal_small.yaml",
    "LMM": "titans_lmm_small.yaml",
}
#: the sliding-window-only model of the same size: no memory, the reference the memory variants are compared to
BASELINE = "swa_baseline_small.yaml"
#: inner-rule settings compared (name -> spec overrides); "as shipped" is the spec's own rule
SETTINGS = {
    "as shipped": [],
    "paper momentum, no clip": ["update.momentum.enabled=true", "update.momentum.form=paper", "update.grad_clip=null"],
    "paper momentum, clip 1": ["update.momentum.enabled=true", "update.momentum.form=paper", "update.grad_clip=1.0"],
    "EMA momentum, no clip": ["update.momentum.enabled=true", "update.momentum.form=ema", "update.grad_clip=null"],
    "EMA momentum, clip 1": ["update.momentum.enabled=true", "update.momentum.form=ema", "update.grad_clip=1.0"],
    "paper momentum, theta / d, no clip": [
        *("update.momentum.enabled=true", "update.momentum.form=paper", "update.grad_clip=null"),
        "update.lr.scale=head_dim",
    ],
    "EMA momentum, theta / d, no clip": [
        *("update.momentum.enabled=true", "update.momentum.form=ema", "update.grad_clip=null"),
        "update.lr.scale=head_dim",
    ],
    "no momentum, no clip": ["update.momentum.enabled=false", "update.grad_clip=null"],
}


def grad_norm(model: torch.nn.Module, batch: TaskBatch) -> float:
    """Total gradient norm of the answer loss on ``batch``."""
    model.zero_grad(set_to_none=True)
    next_token_loss(model(batch.tokens).logits, batch).backward()
    return float(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None) ** 0.5)


def row(batch: TaskBatch, i: int) -> TaskBatch:
    return TaskBatch(batch.tokens[i : i + 1], batch.loss_mask[i : i + 1], batch.answer_group[i : i + 1])


def measure(spec: Path, overrides: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Median and max total norm over seeds x batches, and the largest single-sequence norm of the first batch."""
    norms, single = [], 0.0
    for seed in range(args.seeds):
        model = build(spec, overrides, seed=seed, smoke=False).module
        for b in range(args.batches):
            batch = passkey_batch(args.batch, args.seq_len, digits=2, seed=100 + b)
            norms.append(grad_norm(model, batch))
            if b == 0:
                single = max(single, *(grad_norm(model, row(batch, i)) for i in range(args.batch)))
    return {"median": statistics.median(norms), "max": max(norms), "single": single}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--spec", action="append", type=Path, default=[], help="measure this spec file instead of the shipped variants"
    )
    parser.add_argument("--seeds", type=int, default=3, help="model seeds per setting")
    parser.add_argument("--batches", type=int, default=2, help="batches per seed")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), metavar="SETTING")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    specs = {p.name: p for p in args.spec} or {v: SPECS / VARIANTS[v] for v in args.variants}
    cells = [(v, s) for v in specs for s in args.settings]
    results = {}
    if not args.spec:
        results["SWA baseline", "no memory"] = measure(SPECS / BASELINE, [], args)
    for variant, setting in tqdm(cells, desc="variant x setting", unit="cell"):
        results[variant, setting] = measure(specs[variant], SETTINGS[setting], args)
    base = results.get(("SWA baseline", "no memory"), {}).get("median")
    lines = [
        "| variant | inner rule | median grad norm | x baseline | max grad norm | max single-sequence norm |",
        "|---|---|---|---|---|---|",
    ]
    for (variant, setting), r in results.items():
        ratio = f"{r['median'] / base:.1f}" if base else "-"
        lines.append(f"| {variant} | {setting} | {r['median']:.1f} | {ratio} | {r['max']:.1f} | {r['single']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.no_record:
        return
    body = (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}.  \n"
        f"Shipped specs at their own sizes; the pass-key answer loss ({args.batch} x {args.seq_len} tokens, 2-digit "
        f"keys) at initialisation, {args.seeds} model seeds x {args.batches} batches; the single-sequence column "
        f"is the largest norm of one sequence of the first batch of each seed; 'x baseline' divides the median by "
        f"the sliding-window-only model's ({BASELINE}).\n\n{table}"
    )
    append_section("Outer gradient norm at initialisation", __file__, body)


if __name__ == "__main__":
    main()
