"""The shipped models on a GPU: each memory layer through the generated Triton kernel against the same model on the
chunked PyTorch path, on the same weights and batch: loss, logits and every parameter gradient, and the time and peak
memory of one forward+backward.

For each shipped spec the model is built twice from the same seed, once with ``TITANS_COMPOSE_BACKEND=chunked`` and
once on ``auto`` (the kernel where the generator supports the configuration), then run in float32 and under bf16
autocast.
Both paths are compared with the chunked path in float64 (the reference), so the kernel's errors stand beside the
chunked path's own float32 (or bf16) rounding on the same model; over thousands of tokens some gradients (the
memory's initial weights) move by about 2e-4 from float32 rounding alone.

    python benchmarks/gpu_models.py                       # needs a CUDA GPU
    python benchmarks/gpu_models.py --dry-run             # tiny, float32 only, on the CPU in Triton's interpreter
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # Triton reads this when it is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch

HERE = Path(__file__).resolve().parent
SPECS = HERE.parent / "specs"
MODELS: dict[str, tuple[str, list[str]]] = {
    "MAC": ("titans_mac_small.yaml", []),
    "MAG": ("titans_mag_small.yaml", []),
    "MAL": ("titans_mal_small.yaml", []),
    "LMM": ("titans_lmm_small.yaml", []),
}


def build_on(backend: str, spec: str, overrides: list[str], device: str) -> tuple[torch.nn.Module, int]:
    """The model of ``spec`` with every memory layer on ``backend`` (chunked or auto), seed 0, on ``device``, and
    its vocabulary size."""
    from titans_compose.builder import build
    from titans_compose.ops.memory.dispatch import forced_backend

    with forced_backend(backend):
        built = build(SPECS / spec, overrides, smoke=False)
    return built.module.to(device), built.loaded.spec.model.vocab_size


def forward_backward(model: torch.nn.Module, tokens: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and logits of one next-token forward, after its backward (gradients left on the parameters)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(tokens.device.type, torch.bfloat16, enabled=bf16):
        logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), logits.detach().float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def timed(model: torch.nn.Module, tokens: torch.Tensor, bf16: bool, warmup: int, repeats: int) -> tuple[float, float]:
    """Median milliseconds of a forward+backward and its peak memory in GB (CUDA), after ``warmup`` runs."""
    cuda = tokens.device.type == "cuda"
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        forward_backward(model, tokens, bf16)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
    return statistics.median(times), peak


def compare(name: str, args: argparse.Namespace) -> list[str]:
    """Table rows for one model: the kernel path and the chunked path, each against the chunked path in float64 (the
    reference), in float32 and under bf16 autocast."""
    spec, overrides = MODELS[name]
    chunked, vocab = build_on("chunked", spec, overrides, args.device)
    kernel, _ = build_on(args.kernel_backend, spec, overrides, args.device)
    reference = copy.deepcopy(chunked).double()
    reference.check_finite = False  # a float64 forward checks nothing a float32 one did not
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(args.device)
    ref_loss, ref_logits = forward_backward(reference, tokens, bf16=False)
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    del reference
    rows = []
    for bf16 in args.bf16:
        found = {}
        for path, model in (("kernel", kernel), ("chunked", chunked)):
            loss, logits = forward_backward(model, tokens, bf16)
            errors = {n: rel(p.grad, ref_grads[n]) for n, p in model.named_parameters() if n in ref_grads}
            worst = max(errors, key=errors.__getitem__)
            found[path] = f"{rel(loss, ref_loss):.1e} | {rel(logits, ref_logits):.1e} | {errors[worst]:.1e} ({worst})"
        ms_kernel, gb_kernel = timed(kernel, tokens, bf16, args.warmup, args.repeats)
        ms_chunked, gb_chunked = timed(chunked, tokens, bf16, args.warmup, args.repeats)
        backends = sorted({b for _, b, _ in kernel.memory_backends()})
        rows.append(
            f"| {name} | {'bf16' if bf16 else 'fp32'} | {', '.join(backends)} | {found['kernel']} | "
            f"{found['chunked']} | "
            f"{ms_kernel:.1f} | {ms_chunked:.1f} | {ms_chunked / ms_kernel:.2f}x | {gb_kernel:.2f} | {gb_chunked:.2f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU in Triton's interpreter")
    args = parser.parse_args()
    if args.dry_run:
        args.device, args.batch, args.seq, args.warmup, args.repeats = "cpu", 1, 40, 0, 1
        args.kernel_backend = "triton"  # auto takes the chunked path on CPU tensors
        args.bf16 = [False]  # the interpreter's bfloat16 is wrong (tests/ops/codegen/test_codegen_kernels.py)
    elif not torch.cuda.is_available():
        sys.exit("gpu_models.py needs a CUDA GPU (or --dry-run)")
    else:
        args.device, args.kernel_backend, args.bf16 = "cuda", "auto", [False, True]
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    header = (
        "| model | precision | kernel path's backends | kernel: loss rel | logits rel | "
        "worst gradient rel (parameter) | chunked: loss rel | logits rel | worst gradient rel (parameter) | "
        "kernel ms | chunked ms | speed-up | kernel GB | chunked GB |"
    )
    print(f"batch {args.batch} x {args.seq} tokens; differences are relative norms against the chunked path in float64")
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for name in args.models:
        compare(name, args)


if __name__ == "__main__":
    main()
