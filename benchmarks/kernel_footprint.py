"""Shared memory of the generated kernels compiled for a GPU, on any machine: the measurement behind the size limits
of ``titans_compose/ops/memory/codegen/tiling.py``.

Each configuration's forward and backward kernels are generated and compiled with ``triton.compile`` for an sm_90
target (H100; Triton's bundled ptxas runs without a GPU), with the launch defaults the runtime uses (4 warps). The
table gives each kernel's static shared memory against the 227 KB an H100 block can have; a kernel above it cannot
launch. Registers and spills need the GPU's driver and are not reported. A backward compile takes up to minutes on
a small CPU (Triton caches the cubins, so a rerun is quick).

    python benchmarks/kernel_footprint.py                       # the default grid below, recorded in RESULTS.md
    python benchmarks/kernel_footprint.py --head-dim 64 --hidden 256 --chunk 16 --tile 32 --no-record

``--tile 0`` compiles whole-matrix kernels, a positive tile the depth-2 hidden-tiled ones, and no ``--tile`` the
tile :func:`titans_compose.ops.memory.codegen.tiling.hidden_tile` would choose.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import multiprocessing
import os
import signal
import sys
import tempfile

from kernels import spec_block
from record import append_section
from tqdm import tqdm

from titans_compose.ops.memory.codegen import cache, emit, tiling
from titans_compose.ops.memory.codegen.key import kernel_key
from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.ops.memory.op import memory_config

#: (depth, head dim, hidden, chunk, tile) of the recorded grid: whole matrices around tiling.py's limits, then the
#: shipped memory (64 / 256) and its head-dim-128 version (128 / 512) on hidden tiles around the tiled limits.
GRID = [
    *(
        (depth, head, hidden, chunk, 0)
        for depth, head, hidden, chunk in (
            (1, 64, 64, 64),
            (1, 128, 128, 16),
            (1, 128, 128, 32),
            (1, 128, 128, 64),
            (2, 64, 128, 16),
            (2, 64, 128, 32),
            (2, 64, 64, 64),
            (3, 32, 64, 32),
            (3, 32, 32, 64),
        )
    ),
    *(
        (2, 64, 256, chunk, tile)
        for chunk, tile in ((16, 16), (16, 32), (16, 64), (32, 16), (32, 32), (64, 16), (64, 32))
    ),
    *((2, 128, 512, chunk, tile) for chunk, tile in ((16, 16), (16, 32), (32, 16))),
]


def memory(depth: int, head_dim: int, hidden: int, chunk: int, extra: tuple[str, ...] = ()) -> MemoryConfig:
    """The kernels benchmark's memory (the LMM spec's rules: SiLU, l2 loss, momentum and forget on) at these sizes,
    with ``extra`` spec overrides."""
    block, _, registry = spec_block(head_dim, depth, 1, chunk, expansion=hidden / head_dim, extra=extra)
    cfg = memory_config(block.memory, block.update, registry)
    if depth > 1 and cfg.layer_shapes[0][0] != hidden:
        raise SystemExit(f"hidden {hidden} is not a width the spec's expansion gives for head dim {head_dim}")
    return cfg


def label(depth: int, head_dim: int, hidden: int, chunk: int, tile: int | None) -> dict:
    """A table row's configuration columns (no hidden width for a matrix memory; tile 0 is whole matrices)."""
    return {
        "depth": depth,
        "head": head_dim,
        "hidden": hidden if depth > 1 else "-",
        "chunk": chunk,
        "tile": "whole" if tile == 0 else tile,
    }


def measure(
    depth: int, head_dim: int, hidden: int, chunk: int, tile: int | None, dtype: str, extra: tuple[str, ...] = ()
) -> dict:
    cfg = memory(depth, head_dim, hidden, chunk, extra)
    key = kernel_key(cfg, dtype)
    if tile is not None:
        key = dataclasses.replace(key, hidden_tile=tile)
    module = cache.load(key, emit.generate).module
    row = label(depth, head_dim, hidden, chunk, key.hidden_tile)
    for name in ("forward_kernel", "backward_kernel"):
        row[name.split("_")[0]] = tiling.compile_for_sm90(getattr(module, name), dtype).metadata.shared
    return row


def measure_in_subprocess(point: tuple, dtype: str, timeout: float, extra: tuple[str, ...] = ()) -> dict:
    """:func:`measure` in a fresh process, given up after ``timeout`` seconds (a compile that long is a finding too:
    the row says so)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        job = pool.apply_async(measure, (*point, dtype, extra))
        try:
            return job.get(timeout)
        except multiprocessing.TimeoutError:
            return {**label(*point), "timeout": timeout}


def table(rows: list[dict]) -> str:
    lines = [
        "| depth | head | hidden | chunk | tile | forward KB | backward KB | fits (<= 227 KB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "timeout" in r:
            lines.append(
                f"| {r['depth']} | {r['head']} | {r['hidden']} | {r['chunk']} | {r['tile']} | | | not compiled in"
                f" {r['timeout']:.0f} s |"
            )
            continue
        fits = "yes" if max(r["forward"], r["backward"]) <= tiling.H100_SHARED_PER_BLOCK else "no"
        lines.append(
            f"| {r['depth']} | {r['head']} | {r['hidden']} | {r['chunk']} | {r['tile']} | {r['forward'] / 1024:.0f}"
            f" | {r['backward'] / 1024:.0f} | {fits} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--head-dim", type=int, nargs="+")
    parser.add_argument("--hidden", type=int, nargs="+")
    parser.add_argument("--chunk", type=int, nargs="+")
    parser.add_argument("--tile", type=int, nargs="+", help="hidden tiles to compile (0: whole matrices)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--set", action="append", default=[], help="a spec override, e.g. update.grad_clip=1.0")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one configuration may compile")
    parser.add_argument("--no-record", action="store_true", help="print the table without appending to RESULTS.md")
    args = parser.parse_args()
    given = (args.head_dim, args.hidden, args.chunk)
    if any(given):
        grid = list(
            itertools.product(
                [args.depth], args.head_dim or [64], args.hidden or [256], args.chunk or [16], args.tile or [None]
            )
        )
    else:
        grid = GRID
    os.environ.setdefault(cache.ENV_VAR, tempfile.mkdtemp(prefix="titans-footprint-"))
    # a terminated run exits through the pool's context, which stops the compile in flight (no orphan worker)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = []
    for point in tqdm(grid, desc="sm_90 compiles", unit="config"):
        rows.append(measure_in_subprocess(point, args.dtype, args.timeout, tuple(args.set)))
        tqdm.write(table(rows[-1:]).splitlines()[-1])
    body = table(rows)
    print(body)
    if not args.no_record:
        note = (
            f"Static shared memory of the generated kernels compiled for sm_90 ({args.dtype} inputs, 4 warps"
            f"{''.join(', ' + o for o in args.set)}), "
            f"against {tiling.H100_SHARED_PER_BLOCK // 1024} KB per H100 block; tiling.py's limits: whole matrices "
            f"{tiling.MAX_CHUNK_BY_WIDTHS} / {tiling.MAX_CHUNK_BY_AREAS}, tiled {tiling.TILED_LIMITS}."
        )
        append_section("Generated kernels: shared memory on sm_90", __file__, f"{note}\n\n{body}\n")


if __name__ == "__main__":
    main()
