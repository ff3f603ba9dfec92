"""How recall falls with the number of stored pairs, for a matrix memory (depth 1) and an MLP memory (depth 2) at
the same head size: the memory reads a stream of random key/value pairs once (no outer training) and is then
queried with the same keys.

For each depth the inner learning rate is the best of a small grid (each depth gets its best), momentum and
forgetting are off, b = 1 (the pure per-token recurrence). Reported: mean relative recall error
||M(k) - v|| / ||v|| on the stored pairs (1.0 = nothing recalled, 0 = perfect) and on unseen keys. Prints a table and
appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from record import append_section

from titans_compose.ops.memory import mlp
from titans_compose.ops.memory.chunked import chunked_memory
from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.ops.memory.state import MemoryState
from titans_compose.registry.rules import ACTIVATIONS, LOSSES

THETAS = (0.05, 0.1, 0.2, 0.5)


def recall(depth: int, head_dim: int, pairs: int, theta: float, seeds: int) -> tuple[float, float]:
    """Mean over ``seeds`` of (error on stored keys, error on unseen keys) after one pass over the pairs."""
    hidden = 4 * head_dim
    shapes = ((head_dim, head_dim),) if depth == 1 else ((hidden, head_dim), (head_dim, hidden))
    cfg = MemoryConfig(
        layer_shapes=shapes,
        activation=ACTIVATIONS["silu"][0],
        loss=LOSSES["l2"][0],
        momentum=False,
        forget=False,
        chunk_size=1,
    )
    stored, unseen = 0.0, 0.0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        k = F.normalize(torch.randn(1, pairs, head_dim, generator=g, dtype=torch.float64), dim=-1)
        v = torch.randn(1, pairs, head_dim, generator=g, dtype=torch.float64) / head_dim**0.5
        other = F.normalize(torch.randn(1, pairs, head_dim, generator=g, dtype=torch.float64), dim=-1)
        weights = [torch.randn(1, o, i, generator=g, dtype=torch.float64) / i**0.5 for o, i in shapes]
        thetas = torch.full((1, pairs), theta, dtype=torch.float64)
        _, state = chunked_memory(k, k, v, thetas, None, None, MemoryState.initial(weights, False), cfg)
        for keys, acc in ((k, "stored"), (other, "unseen")):
            err = ((mlp.forward(state.weights, keys, cfg) - v).norm(dim=-1) / v.norm(dim=-1)).mean().item()
            if acc == "stored":
                stored += err / seeds
            else:
                unseen += err / seeds
    return stored, unseen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--pairs", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for pairs in args.pairs:
        row = [str(pairs)]
        for depth in (1, 2):
            best = min((recall(depth, args.head_dim, pairs, th, args.seeds), th) for th in THETAS)
            (stored, unseen), theta = best
            row += [f"{stored:.3f}", f"{unseen:.3f}", f"{theta}"]
        rows.append(row)
        print(" | ".join(row), flush=True)
    header = (
        "| pairs | depth 1 error (stored) | depth 1 error (unseen) | depth 1 theta | depth 2 error (stored) "
        "| depth 2 error (unseen) | depth 2 theta |"
    )
    table = "\n".join([header, "|" + "|".join(["---"] * 7) + "|", *("| " + " | ".join(r) + " |" for r in rows)])
    print(table)
    if args.no_record:
        return
    append_section(
        "Recall against the number of stored pairs",
        __file__,
        f"Head dim {args.head_dim} for both memories (depth 2: hidden {4 * args.head_dim}, SiLU), one pass over "
        f"random unit keys and values, b = 1, no momentum or forgetting, best theta of {list(THETAS)} per cell, "
        f"mean over {args.seeds} seeds. Error = mean ||M(k) - v|| / ||v|| (1 = nothing recalled).\n\n"
        f"{table}",
    )


if __name__ == "__main__":
    main()
