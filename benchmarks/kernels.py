"""The generated Triton kernels on a GPU against the chunked PyTorch path, titans-pytorch and FLA: forward and
forward+backward over sequence lengths 2K..32K, head dims 64 and 128, memory depth 1 and 2, bf16.

Implementations (``--impls``), each configuration in a fresh process:

- ``triton``: the generated kernel (``titans_compose.ops.memory.codegen.runtime.triton_memory``), the memory scan alone;
- ``chunked``: the chunked dual form in PyTorch (``chunked_memory``) on the same inputs;
- ``fla``: FLA's ``chunk_gated_delta_rule`` (PyPI flash-linear-attention, optional) on q, k, v of the same shapes,
  the forget gate as its decay and the inner learning rate as its beta; depth 1 only (a matrix memory);
- ``ours-module``: the memory layer of the model ``titans_compose.build`` makes of the LMM spec at these sizes (a
  ``NeuralMemory``: projections, convolutions, gates, norms), its backend forced to the kernel;
- ``titans-pytorch``: titans-pytorch's ``NeuralMemory`` at the same sizes (optional: install it in an environment
  of its own and give ``--titans-python``, as for compare_titans_pytorch.py).

The first three are the memory scan alone ([batch x heads, T, d] inputs), the last two whole modules ([batch, T,
heads x d]). Batch x heads fills the GPU: ``--rows`` rows (default twice the number of SMs; one program runs one
row), heads = ``--width`` / head dim. Times are medians of ``--repeats`` runs after ``--warmup`` (CUDA events);
tokens/s counts batch x T tokens; TFLOP/s is the dual form's matmul work (``titans_compose.ops.memory.flops``: 2 m k n
per product, 3x the forward for forward+backward), the same count for every implementation, against a bf16 matmul
timed in the same run; peak memory is ``torch.cuda.max_memory_allocated`` over one forward+backward. Prints a
table and appends it with the device, date and command to benchmarks/RESULTS.md.

    python benchmarks/kernels.py                                   # the full grid (needs a CUDA GPU)
    python benchmarks/kernels.py --seqs 8192 --depths 2 --no-record
    python benchmarks/kernels.py --dry-run   # tiny shapes on the CPU in Triton's interpreter: checks the code path
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from record import append_section

HERE = Path(__file__).resolve().parent
SPEC = HERE.parent / "specs" / "titans_lmm_small.yaml"
IMPLS = ("triton", "chunked", "fla", "ours-module", "titans-pytorch")
MODULES = ("ours-module", "titans-pytorch")
EXPANSION = 4
DRY = {"seqs": [40], "head_dims": [16], "depths": [1, 2], "width": 32, "rows": 2, "chunk": 16}


# ------------------------------------------------------------------------------------------------ one configuration


def size_overrides(d: int, depth: int, heads: int, chunk: int, expansion: float = EXPANSION) -> list[str]:
    """The LMM spec's overrides for these sizes."""
    return [
        f"model.dim={heads * d}",
        f"memory.heads={heads}",
        f"memory.head_dim={d}",
        f"memory.depth={depth}",
        f"memory.expansion={expansion}",
        f"memory.chunk_size={chunk}",
    ]


def spec_block(d: int, depth: int, heads: int, chunk: int, expansion: float = EXPANSION, extra: tuple[str, ...] = ()):
    """The LMM spec's block at these sizes (``extra``: more spec overrides), with its model section and registry."""
    from titans_compose.registry import new_registry
    from titans_compose.spec import load_spec

    registry = new_registry()
    loaded = load_spec(SPEC, [*extra, *size_overrides(d, depth, heads, chunk, expansion)], registry=registry)
    return loaded.spec.blocks[0], loaded.spec.model, registry


def built_memory_layer(d: int, depth: int, heads: int, chunk: int) -> Any:
    """The first memory layer of the model ``titans_compose.build`` makes of the LMM spec at these sizes (one
    layer), its backend forced to the generated kernel the way a user forces it: the environment variable, read by
    the graph's backend pass into the layer's op. The layer is a NeuralMemory; it checks its own calls' finiteness,
    as the model checks them."""
    from titans_compose.builder import build
    from titans_compose.ops.memory.dispatch import forced_backend

    overrides = [*size_overrides(d, depth, heads, chunk), "blocks.0.repeat=1"]
    with forced_backend("triton"):
        module = build(SPEC, overrides, smoke=False).module
    layer = module.memory_layers()[0][1]
    layer.check_finite = True
    return layer


def core_inputs(cfg: Any, rows: int, seq: int, d: int, dtype: Any, device: str) -> tuple[list, Any]:
    """Leaves (q, k, v, theta, log eta, log keep, initial weights; None for a gate that is off) and the state."""
    import torch
    import torch.nn.functional as F

    from titans_compose.ops.memory.state import MemoryState

    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    q, k = F.normalize(rand(rows, seq, d), dim=-1), F.normalize(rand(rows, seq, d), dim=-1)
    v = rand(rows, seq, d)
    theta = 0.01 + 0.1 * torch.rand(rows, seq, generator=gen, device=device)
    log_eta = F.logsigmoid(rand(rows, seq) + 2) if cfg.momentum else None
    log_keep = F.logsigmoid(-rand(rows, seq) - 6) if cfg.forget else None
    weights = [rand(rows, o, i) / i**0.5 for o, i in cfg.layer_shapes]
    raw = [q, k, v, theta, log_eta, log_keep, *weights]
    leaves = [None if t is None else t.to(dtype).requires_grad_() for t in raw]
    return leaves, MemoryState.initial(leaves[6:], cfg.momentum)


def make_step(args: argparse.Namespace) -> tuple[Callable[[], Any], list, Callable[[Any], Any]]:
    """(run the implementation once -> output, the tensors that need gradients, output -> the tensor to
    differentiate) for the configuration in ``args``."""
    import torch

    dtype = getattr(torch, args.dtype)
    heads = args.width // args.d
    batch = math.ceil(args.rows / heads)
    if args.impl == "titans-pytorch":
        from titans_pytorch import MemoryMLP, NeuralMemory

        module = NeuralMemory(
            dim=args.width,
            chunk_size=args.chunk,
            heads=heads,
            dim_head=args.d,
            model=MemoryMLP(args.d, depth=args.depth, expansion_factor=EXPANSION),
        ).to(args.device, dtype)
        x = torch.randn(batch, args.seq, args.width, device=args.device, dtype=dtype)
        return lambda: module(x), list(module.parameters()), lambda out: out[0]
    if args.impl == "ours-module":
        ours = built_memory_layer(args.d, args.depth, heads, args.chunk).to(args.device, dtype)
        x = torch.randn(batch, args.seq, args.width, device=args.device, dtype=dtype)
        ours(x)  # resolves the backend
        if ours.choice.name != "triton":
            raise NotImplementedError(ours.choice.reason)
        return lambda: ours(x), list(ours.parameters()), lambda out: out[0]
    block, _, registry = spec_block(args.d, args.depth, heads, args.chunk)
    from titans_compose.ops.memory.op import memory_config

    cfg = memory_config(block.memory, block.update, registry)
    rows = batch * heads
    leaves, state = core_inputs(cfg, rows, args.seq, args.d, dtype, args.device)
    grads = [t for t in leaves if t is not None]
    if args.impl == "fla":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        def heads_last(t: torch.Tensor) -> torch.Tensor:  # [B*H, T, ...] -> a new leaf [B, T, H, ...]
            return t.detach().view(batch, heads, *t.shape[1:]).transpose(1, 2).contiguous().requires_grad_()

        q, k, v, theta = (heads_last(t) for t in leaves[:4])
        keep = leaves[5]
        gate = heads_last(keep.float()) if keep is not None else torch.zeros_like(theta, dtype=torch.float32)
        fla = [q, k, v, theta, *([gate] if keep is not None else [])]
        return lambda: chunk_gated_delta_rule(q=q, k=k, v=v, g=gate, beta=theta), fla, lambda out: out[0]
    if args.impl == "triton":
        from titans_compose.ops.memory.codegen.runtime import triton_memory as fn
    else:
        from titans_compose.ops.memory.chunked import chunked_memory as fn
    return lambda: fn(*leaves[:6], state, cfg), grads, lambda out: out[0]


def median_ms(step: Callable[[], Any], warmup: int, repeats: int, cuda: bool) -> float:
    """Median milliseconds of ``step`` after ``warmup`` untimed calls (CUDA events on a GPU)."""
    import torch

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            step()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Time one implementation at one configuration: forward (no autograd), forward+backward, peak memory."""
    import torch

    cuda = args.device == "cuda"
    if args.impl == "matmul":
        n = 8192 if cuda else 256
        a, b = (torch.randn(n, n, device=args.device, dtype=getattr(torch, args.dtype)) for _ in range(2))
        ms = median_ms(lambda: a @ b, args.warmup, args.repeats, cuda)
        return {"status": "ok", "tflops": 2 * n**3 / (ms * 1e-3) / 1e12}
    run, grads, output = make_step(args)
    probe = output(run()).detach()
    dy = torch.randn_like(probe)

    def forward() -> None:
        with torch.no_grad():
            run()

    def forward_backward() -> None:
        for t in grads:
            t.grad = None
        torch.autograd.backward(output(run()), dy)

    result = {
        "status": "ok",
        "fwd_ms": median_ms(forward, args.warmup, args.repeats, cuda),
        "fwd_bwd_ms": median_ms(forward_backward, args.warmup, args.repeats, cuda),
        "peak_gb": None,
    }
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        forward_backward()
        torch.cuda.synchronize()
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def worker(args: argparse.Namespace) -> None:
    """Print one JSON line: the measurement, or why there is none."""
    import torch

    try:
        result = measure(args)
    except ModuleNotFoundError as exc:
        result = {"status": f"not installed ({exc.name})"}
    except NotImplementedError as exc:
        result = {"status": f"unsupported: {exc}"}
    except torch.cuda.OutOfMemoryError:
        result = {"status": "out of memory"}
    print(json.dumps(result))


# ------------------------------------------------------------------------------------------------ the grid


def run_point(python: str, args: argparse.Namespace, impl: str, point: dict[str, int], env: dict) -> dict[str, Any]:
    """One implementation at one configuration in a fresh process."""
    cmd = [python, __file__, "--worker", "--impl", impl, "--device", args.device, "--dtype", args.dtype]
    cmd += ["--warmup", str(args.warmup), "--repeats", str(args.repeats), "--chunk", str(args.chunk)]
    cmd += ["--width", str(args.width), "--rows", str(args.rows)]
    cmd += [f"--{name}={value}" for name, value in point.items()]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {args.timeout} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed: {last[:200]}"}
    return json.loads(lines[-1])


def flops(args: argparse.Namespace, d: int, depth: int, seq: int) -> int:
    """Forward+backward matmul FLOPs of the memory scan at this configuration (all rows)."""
    from titans_compose.ops.memory.flops import memory_flops
    from titans_compose.ops.memory.op import memory_config

    heads = args.width // d
    block, _, registry = spec_block(d, depth, heads, args.chunk)
    rows = math.ceil(args.rows / heads) * heads
    return memory_flops(memory_config(block.memory, block.update, registry), rows, seq, args.chunk)[1]


def table(args: argparse.Namespace, points: list, results: dict, peak: float | None) -> str:
    header = (
        "| impl | seq | batch x heads | head dim | depth | fwd ms | fwd+bwd ms | tok/s fwd+bwd | TFLOP/s fwd+bwd "
        "| % of matmul peak | peak GB | note |"
    )
    lines = [header, "|" + "|".join(["---"] * 12) + "|"]
    for point in points:
        seq, d, depth = point["seq"], point["d"], point["depth"]
        heads = args.width // d
        batch = math.ceil(args.rows / heads)
        work = flops(args, d, depth, seq)
        for impl in args.impls:
            r = results[(impl, seq, d, depth)]
            where = f"| {impl} | {seq} | {batch} x {heads} | {d} | {depth} |"
            if r["status"] != "ok":
                lines.append(where + " - |" * 6 + f" {r['status']} |")
                continue
            tflops = work / (r["fwd_bwd_ms"] * 1e-3) / 1e12
            share = f"{100 * tflops / peak:.3g}" if peak else "-"
            mem = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "-"
            note = "whole module" if impl in MODULES else "memory scan"
            lines.append(
                f"{where} {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} "
                f"| {batch * seq / (r['fwd_bwd_ms'] * 1e-3):,.0f} | {tflops:.3g} | {share} | {mem} | {note} |"
            )
    return "\n".join(lines)


def speedups(args: argparse.Namespace, points: list, results: dict) -> str:
    """The generated kernel's forward+backward speed-up over each other implementation, per configuration."""
    pairs = [("triton", "chunked"), ("triton", "fla"), ("ours-module", "titans-pytorch")]
    pairs = [(a, b) for a, b in pairs if a in args.impls and b in args.impls]
    lines = ["| seq | head dim | depth | " + " | ".join(f"{b} / {a}" for a, b in pairs) + " |"]
    lines.append("|" + "|".join(["---"] * (3 + len(pairs))) + "|")
    for point in points:
        cells = []
        for a, b in pairs:
            ra, rb = (results[(impl, point["seq"], point["d"], point["depth"])] for impl in (a, b))
            ok = ra["status"] == rb["status"] == "ok"
            cells.append(f"{rb['fwd_bwd_ms'] / ra['fwd_bwd_ms']:.2f}x" if ok else "-")
        lines.append(f"| {point['seq']} | {point['d']} | {point['depth']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument(
        "--chunk",
        type=int,
        default=16,
        help="memory chunk size: the shipped specs' 16 (FLA uses its own, 64; at 64 the depth-2 memory of head dim 64 "
        "fits no hidden tile, see titans_compose/ops/memory/codegen/tiling.py)",
    )
    parser.add_argument("--width", type=int, default=1024, help="heads x head dim (heads = width / head dim)")
    parser.add_argument("--rows", type=int, help="batch x heads at least this (default: twice the GPU's SMs)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per implementation and configuration")
    parser.add_argument("--titans-python", default=os.environ.get("TITANS_PYTORCH_PYTHON"))
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny fp32 shapes on the CPU in Triton's interpreter")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=[*IMPLS, "matmul"], help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--d", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    import torch

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if args.dry_run:
        args.seqs, args.head_dims, args.depths = DRY["seqs"], DRY["head_dims"], DRY["depths"]
        args.width, args.rows, args.chunk = DRY["width"], DRY["rows"], DRY["chunk"]
        args.device, args.dtype, args.warmup, args.repeats, args.no_record = "cpu", "float32", 1, 1, True
        env["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        sys.exit(
            "benchmarks/kernels.py times Triton kernels on a CUDA GPU and found none; run it with --dry-run to check "
            "the code path on the CPU (tiny shapes, Triton's interpreter)"
        )
    if args.rows is None:
        args.rows = 2 * torch.cuda.get_device_properties(0).multi_processor_count
    points = [{"seq": s, "d": d, "depth": n} for s in args.seqs for d in args.head_dims for n in args.depths]
    jobs = [(impl, p) for p in points for impl in args.impls]
    from tqdm import tqdm

    peak_run = run_point(sys.executable, args, "matmul", {}, env)
    peak = peak_run.get("tflops")
    results = {}
    for impl, point in tqdm(jobs, desc="configurations", unit="run"):
        key = (impl, point["seq"], point["d"], point["depth"])
        if impl == "fla" and point["depth"] != 1:
            results[key] = {"status": "depth 1 only"}
        elif impl == "fla" and args.device != "cuda":
            results[key] = {"status": "needs CUDA"}
        elif impl == "titans-pytorch" and args.titans_python:
            results[key] = run_point(args.titans_python, args, impl, point, env)
        else:
            results[key] = run_point(sys.executable, args, impl, point, env)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({platform.machine()}, interpreter)"
    peak_text = f"{peak:.3g} TFLOP/s" if peak else f"not measured ({peak_run['status']})"
    report = f"{table(args, points, results, peak)}\n\nSpeed-up of the generated kernel, forward+backward:\n\n"
    report += speedups(args, points, results)
    print(f"{device}; {args.dtype} matmul peak {peak_text}\n\n{report}")
    if args.no_record:
        return
    body = (
        f"torch {torch.__version__}, triton {_triton_version()}, {args.dtype}, chunk {args.chunk}, width "
        f"{args.width}, expansion {EXPANSION}, rows >= {args.rows}; median of {args.repeats} after {args.warmup} "
        f"warm-up runs, each configuration in a fresh process; measured {args.dtype} matmul peak {peak_text}. "
        "TFLOP/s counts the dual form's matmul work (titans_compose.ops.memory.flops) for every implementation.\n\n"
        f"{report}"
    )
    append_section(f"Generated kernels on {device}", __file__, body, argv)


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    main()
