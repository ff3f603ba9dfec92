"""Tokens per second and peak memory of ``titans-compose train``: one against two data-parallel processes, with and
without activation checkpointing, per precision; one process against two splitting each long sequence
(``--context-parallel 2``); and, with CUDA, tokens/s and MFU on 1 and N GPUs.

Every configuration is a fresh ``titans-compose train`` run (``torchrun`` for several processes) of the MAC spec,
each process running the command in-process through a small wrapper that records its peak resident memory
(VmHWM) and, on CUDA, ``torch.cuda.max_memory_allocated``. Tokens/s is the median over the run's steps after
``--warmup`` steps of the loop's own per-step figure (global batch tokens over the step's wall time); each
configuration runs ``--repeats`` times, the configurations interleaved round by round, and the table gives the
median and the spread of the runs. "train MB" is the peak resident memory above the wrapper's after importing
torch and titans_compose: the model (and the build's smoke check), optimizer, data and activations, plus what the
allocator keeps cached (glibc's default; fixing its mmap threshold low makes the resident set follow the live
tensors but slows the steps several-fold with page faults). Ratios are of the medians.

The precision axis is a list of ``train`` flags (:data:`PRECISIONS`); a precision whose flag ``train --help`` does
not list is reported as not available rather than run.

Context-parallel section: MAC (whose segments run one after another, each exchanged between the processes) and MAG
(one exchange per sequence mixer and layer) on ``--long-seq-len`` tokens x ``--long-batch`` rows, one process
against two with ``--context-parallel 2``, which take the same global batch (each process half of every sequence).

GPU section (CUDA only): one process and one per GPU, bf16 where ``train`` offers it, at a larger width;
MFU = 6 x parameters x tokens/s / (GPUs x a bf16 matmul's measured TFLOP/s), which leaves out attention scores
and the memory's inner loop: a lower bound.

    python benchmarks/train_throughput.py                  # the CPU section (and the GPU one with CUDA)
    python benchmarks/train_throughput.py --repeats 5 --steps 12 --no-record
    python benchmarks/train_throughput.py --dry-run        # both sections' code paths on the CPU, tiny and quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from record import append_section

HERE = Path(__file__).resolve().parent
SPEC = HERE.parent / "specs" / "titans_mac_small.yaml"
#: train flags of each precision (a precision whose first flag ``train --help`` lacks is not run)
PRECISIONS: dict[str, list[str]] = {"fp32": [], "bf16": ["--precision", "bf16"]}
#: the CPU section's model: the MAC spec at its own sizes, 4 layers (checkpointing saves nothing with one layer:
#: the backward pass recomputes it whole)
CPU_SETS = ["blocks.0.repeat=4"]
#: the GPU section's model: wider, 4 layers
GPU_SETS = ["model.dim=512", "memory.heads=8", "attention.heads=8", "blocks.0.repeat=4"]
#: --dry-run: the tiniest model that runs every code path
DRY_SETS = ["model.dim=32", "memory.head_dim=16", "memory.heads=1", "attention.heads=2", "blocks.0.repeat=1"]
#: the context-parallel section's models: the shipped specs at 4 layers (memory heads 2, attention heads 4)
LONG_SPECS = {"MAC": SPEC, "MAG": HERE.parent / "specs" / "titans_mag_small.yaml"}
#: --dry-run of the context-parallel section: tiny, with heads that split over two processes
LONG_DRY_SETS = ["model.dim=32", "memory.head_dim=16", "memory.heads=2", "attention.heads=2", "blocks.0.repeat=1"]


# ------------------------------------------------------------------------------------------------ one process


def memory_status(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def worker(report: Path, train_argv: list[str]) -> None:
    """Run ``titans-compose train`` in this process and write this rank's memory figures to ``report``-<rank>."""
    import torch

    import titans_compose.builder
    import titans_compose.cli.train
    import titans_compose.train.run  # noqa: F401  (imported before the baseline: code is not training memory)
    from titans_compose.cli.main import cli

    base = memory_status("VmRSS")
    try:
        cli.main(["train", *train_argv], standalone_mode=False)
    finally:
        rank = os.environ.get("RANK", "0")
        cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        figures = {"base_mb": base, "peak_mb": memory_status("VmHWM"), "cuda_mb": cuda}
        Path(f"{report}-{rank}.json").write_text(json.dumps(figures))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_argv(
    args: argparse.Namespace, out: Path, sets: list[str], flags: list[str], device: str, spec: Path = SPEC
) -> list[str]:
    sizes = ["--seq-len", str(args.seq_len), "--batch", str(args.batch), "--steps", str(args.steps)]
    quiet = ["--no-progress", "--eval-every", str(args.steps), "--eval-batches", "1", "--max-mb", "2"]
    return [
        str(spec),
        "-o",
        str(out),
        "--device",
        device,
        *sizes,
        *quiet,
        *flags,
        *(a for s in sets for a in ("--set", s)),
    ]


def run_config(
    args: argparse.Namespace, ranks: int, flags: list[str], sets: list[str], device: str, spec: Path = SPEC
) -> dict:
    """One ``train`` run of ``spec`` on ``ranks`` processes (each with ``--batch`` rows: the global batch grows with
    the data-parallel ranks): median tokens/s after the warm-up steps and the largest per-rank memory, or
    ``status`` saying why not."""
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        out, report = Path(tmp) / "run", Path(tmp) / "memory"
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
        command = [sys.executable, *(launcher if ranks > 1 else []), __file__, "--worker", str(report), "--"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
        began = time.perf_counter()
        done = subprocess.run(
            [*command, *train_argv(args, out, sets, flags, device, spec)], capture_output=True, text=True, env=env
        )
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {"status": f"failed: {tail[:200]}"}
        history = json.loads((out / "metrics.json").read_text())["history"]
        ranks_memory = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("memory-*.json"))]
    speeds = [r["tokens_per_s"] for r in history[args.warmup :]]
    return {
        "status": "ok",
        "tokens_per_s": statistics.median(speeds),
        "peak_mb": max(m["peak_mb"] for m in ranks_memory),
        "train_mb": max(m["peak_mb"] - m["base_mb"] for m in ranks_memory),
        "cuda_mb": max((m["cuda_mb"] or 0.0) for m in ranks_memory) or None,
        "seconds": time.perf_counter() - began,
    }


def available(flags: list[str]) -> bool:
    """Whether ``train`` has the first of ``flags`` (no flags: always)."""
    if not flags:
        return True
    from click.testing import CliRunner

    from titans_compose.cli.main import cli

    return flags[0] in CliRunner().invoke(cli, ["train", "--help"]).output


def parameters(sets: list[str]) -> int:
    from titans_compose.builder import build

    return sum(p.numel() for p in build(SPEC, sets, smoke=False).module.parameters())


def matmul_tflops(device: str, size: int, dtype_name: str) -> float:
    """A square matmul's speed, TFLOP/s: median of 10 after 3 warm-up calls."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(13):
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - began)
    return 2 * size**3 / statistics.median(times) / 1e12


# ------------------------------------------------------------------------------------------------ the sections


Config = tuple[int, bool, str]  # ranks, activation checkpointing, precision


def measure(args: argparse.Namespace, configs: list[Config], sets: list[str], device: str) -> dict[Config, list]:
    """Every configuration ``--repeats`` times, interleaved round by round (the machine's speed drifts)."""
    runs: dict[Config, list] = {c: [] for c in configs}
    for round_ in range(args.repeats):
        for ranks, checkpointing, precision in configs:
            flags = [*PRECISIONS[precision], *(["--activation-checkpointing"] if checkpointing else [])]
            result = run_config(args, ranks, flags, sets, device)
            runs[(ranks, checkpointing, precision)].append(result)
            print(f"round {round_ + 1}: {ranks} x {precision}, checkpointing {checkpointing}: {result}", flush=True)
    return runs


def summary(results: list[dict]) -> dict[str, Any]:
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return {"status": results[0]["status"] if results else "not run"}
    speeds = [r["tokens_per_s"] for r in ok]
    cuda = [r["cuda_mb"] for r in ok if r["cuda_mb"]]
    return {
        "status": "ok",
        "tokens_per_s": statistics.median(speeds),
        "range": (min(speeds), max(speeds)),
        "peak_mb": statistics.median(r["peak_mb"] for r in ok),
        "train_mb": statistics.median(r["train_mb"] for r in ok),
        "cuda_mb": statistics.median(cuda) if cuda else None,
    }


def ratio(a: dict, b: dict, key: str) -> str:
    if a.get("status") != "ok" or b.get("status") != "ok" or not b.get(key):
        return "-"
    return f"{a[key] / b[key]:.2f}x"


def measured_row(what: str, s: dict) -> str:
    """A table row: ``what`` (the configuration's cells), then tokens/s, the runs' range, peak RSS and train MB of
    its :func:`summary` ``s``, or its status when it did not run."""
    if s["status"] != "ok":
        return f"{what} {s['status']} | | | |"
    low, high = s["range"]
    return f"{what} {s['tokens_per_s']:,.0f} | {low:,.0f}-{high:,.0f} | {s['peak_mb']:,.0f} | {s['train_mb']:,.0f} |"


def cpu_table(args: argparse.Namespace, stats: dict[Config, dict]) -> str:
    rows = [
        "| processes | activation checkpointing | precision | tokens/s | runs' range | peak RSS MB | train MB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (ranks, ck, precision), s in stats.items():
        rows.append(measured_row(f"| {ranks} | {'on' if ck else 'off'} | {precision} |", s))
    rows += ["", "| ratio | precision | value |", "| --- | --- | --- |"]
    for precision in args.precisions:
        one, two = stats.get((1, False, precision), {}), stats.get((2, False, precision), {})
        plain, ck = stats.get((1, False, precision), {}), stats.get((1, True, precision), {})
        rows.append(f"| tokens/s, 2 processes / 1 | {precision} | {ratio(two, one, 'tokens_per_s')} |")
        rows.append(f"| train MB, checkpointing / without | {precision} | {ratio(ck, plain, 'train_mb')} |")
        rows.append(f"| tokens/s, checkpointing / without | {precision} | {ratio(ck, plain, 'tokens_per_s')} |")
    for precision in args.precisions[1:]:
        low, base = stats.get((1, False, precision), {}), stats.get((1, False, args.precisions[0]), {})
        rows.append(
            f"| tokens/s, {precision} / {args.precisions[0]} | 1 process | {ratio(low, base, 'tokens_per_s')} |"
        )
        rows.append(f"| train MB, {precision} / {args.precisions[0]} | 1 process | {ratio(low, base, 'train_mb')} |")
    return "\n".join(rows)


LongConfig = tuple[str, int]  # model (a LONG_SPECS key), context-parallel processes (1: one plain process)


def measure_long(args: argparse.Namespace, sets: list[str]) -> dict[LongConfig, list]:
    """The context-parallel section's configurations, ``--repeats`` times, interleaved round by round, on
    ``--long-seq-len`` x ``--long-batch``."""
    long_args = argparse.Namespace(**{**vars(args), "seq_len": args.long_seq_len, "batch": args.long_batch})
    configs = [(name, ranks) for name in LONG_SPECS for ranks in (1, 2)]
    runs: dict[LongConfig, list] = {c: [] for c in configs}
    for round_ in range(args.repeats):
        for name, ranks in configs:
            flags = ["--context-parallel", str(ranks)] if ranks > 1 else []
            result = run_config(long_args, ranks, flags, sets, "cpu", LONG_SPECS[name])
            runs[(name, ranks)].append(result)
            print(f"round {round_ + 1}: {name}, {ranks} context-parallel process(es): {result}", flush=True)
    return runs


def long_table(stats: dict[LongConfig, dict]) -> str:
    rows = [
        "| model | processes | tokens/s | runs' range | peak RSS MB | train MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (name, ranks), s in stats.items():
        rows.append(measured_row(f"| {name} | {'1' if ranks == 1 else f'{ranks}, --context-parallel {ranks}'} |", s))
    rows += ["", "| ratio, context parallel 2 / 1 process | model | value |", "| --- | --- | --- |"]
    for name in LONG_SPECS:
        one, two = stats.get((name, 1), {}), stats.get((name, 2), {})
        rows.append(f"| tokens/s | {name} | {ratio(two, one, 'tokens_per_s')} |")
        rows.append(f"| train MB per process | {name} | {ratio(two, one, 'train_mb')} |")
    return "\n".join(rows)


def gpu_table(stats: dict[Config, dict], params: int, peak: float, tokens_flops: int) -> str:
    rows = ["| GPUs | precision | tokens/s | MFU | peak allocated MB |", "| --- | --- | --- | --- | --- |"]
    for (ranks, _, precision), s in stats.items():
        if s["status"] != "ok":
            rows.append(f"| {ranks} | {precision} | {s['status']} | | |")
            continue
        mfu = tokens_flops * s["tokens_per_s"] / (ranks * peak * 1e12)
        cuda = f"{s['cuda_mb']:,.0f}" if s["cuda_mb"] else "-"
        rows.append(f"| {ranks} | {precision} | {s['tokens_per_s']:,.0f} | {100 * mfu:.1f}% | {cuda} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(Path(argv[1]), argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="sequences per process and step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of each run's median")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--long-seq-len", type=int, default=2048, help="the context-parallel section's sequences")
    parser.add_argument("--long-batch", type=int, default=1, help="the context-parallel section's global batch")
    parser.add_argument("--no-long", action="store_true", help="leave out the context-parallel section")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, 3 steps, 1 run: checks the code paths")
    args = parser.parse_args(argv)
    import torch

    cpu_sets, gpu_sets, gpu_device, matmul = CPU_SETS, GPU_SETS, "cuda", (8192, "bfloat16")
    long_sets = CPU_SETS
    if args.dry_run:
        args.seq_len, args.batch, args.steps, args.warmup, args.repeats, args.no_record = 32, 2, 3, 1, 1, True
        args.long_seq_len = 64
        cpu_sets = gpu_sets = DRY_SETS
        long_sets = LONG_DRY_SETS
        gpu_device, matmul = "cpu", (128, "float32")  # the GPU section's code path, on the CPU
    missing = [p for p in args.precisions if not available(PRECISIONS[p])]
    for p in missing:
        print(f"{p}: train has no {PRECISIONS[p][0]} option here; not run")
    precisions = [p for p in args.precisions if p not in missing]
    configs = [(r, ck, p) for p in precisions for r, ck in ((1, False), (2, False), (1, True))]
    stats = {c: summary(rs) for c, rs in measure(args, configs, cpu_sets, "cpu").items()}
    stats.update({(1, False, p): {"status": f"not available (no {PRECISIONS[p][0]})"} for p in missing})
    report = cpu_table(args, stats)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\nCPU ({machine}), torch {torch.__version__}, {args.threads} thread(s) per process\n\n{report}")

    long_report = ""
    if not args.no_long:
        long_stats = {c: summary(rs) for c, rs in measure_long(args, long_sets).items()}
        long_report = (
            f"\n\nContext parallelism: {args.long_batch} x {args.long_seq_len} tokens per step (the global batch "
            f"either way), {', '.join(long_sets)}\n\n{long_table(long_stats)}"
        )
        print(long_report)

    gpu_report = ""
    gpus = torch.cuda.device_count() if not args.dry_run else 2
    if torch.cuda.is_available() or args.dry_run:
        precision = "bf16" if "bf16" in precisions else "fp32"
        gpu_configs = [(n, False, precision) for n in sorted({1, gpus})]
        gpu_stats = {c: summary(rs) for c, rs in measure(args, gpu_configs, gpu_sets, gpu_device).items()}
        peak = matmul_tflops(gpu_device, *matmul)
        params = parameters(gpu_sets)
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else "CPU (dry run)"
        gpu_report = (
            f"\n\n{device}: {matmul[1]} matmul peak {peak:.3g} TFLOP/s (measured), {params:,} parameters, "
            f"MFU counts 6 x parameters per token\n\n{gpu_table(gpu_stats, params, peak, 6 * params)}"
        )
        print(gpu_report)
    if args.no_record:
        return
    body = (
        f"CPU: {machine}, torch {torch.__version__}, {args.threads} thread(s) per process; MAC spec "
        f"({', '.join(CPU_SETS)}), seq {args.seq_len}, batch {args.batch} per process, {args.steps} steps; tokens/s "
        f"is the median over steps {args.warmup + 1}-{args.steps} of each run, then over {args.repeats} runs "
        f"interleaved round by round.\n\n{report}{long_report}{gpu_report}"
    )
    append_section("Training throughput and memory", __file__, body, argv)


if __name__ == "__main__":
    main()
