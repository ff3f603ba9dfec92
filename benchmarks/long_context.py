"""Does the long-term memory remember? Tiny MAC, MAG, MAL, LMM and sliding-window-only models trained on pass-key
retrieval with the needle far beyond the attention window, and on real text.

For every variant (the shipped specs, shrunk to one size by the same overrides, each with its spec's inner update
rule: momentum and forget on): train on pass-key sequences whose needle lies anywhere in the context, then score
exact-match accuracy (every answer digit right, teacher-forced argmax, which equals greedy decoding for an answer
that ends the sequence) with the needle at the very start, at several context lengths: the distance from the needle
to the answer is then about the context length, at least 4x the attention window. Separately, a copy of each model
is trained for a few steps on the Python standard library's source (bytes) and its validation loss is reported in
bits per byte.

Prints a table; unless ``--no-record``, writes a plot (benchmarks/long_context.png, needs matplotlib: `pip install
matplotlib`) and appends the table with the date and the command to benchmarks/RESULTS.md.

    python benchmarks/long_context.py                     # the recorded run
    python benchmarks/long_context.py --steps 20 --lm-steps 5 --no-record   # a quick look
    python benchmarks/long_context.py --variants MAC --set update.momentum.enabled=true   # MAC with momentum

Side by side with the reference implementation: ``--titans-python PY`` adds the variant ``titans-pytorch``, lucidrains'
titans-pytorch ``MemoryAsContextTransformer`` at the same width, depth, attention window and heads, persistent tokens
and memory (2 heads x 32, an MLP of depth 2 and expansion 4), with its default memory update (momentum on),
trained by the same loop on the same batches and scored the same way. It runs in that interpreter's own
virtualenv, which also needs this package for the loop and the data:

    python -m venv /tmp/tp && /tmp/tp/bin/pip install torch==2.13.0 titans-pytorch==0.5.5 -e .
    python benchmarks/long_context.py --variants MAC titans-pytorch --titans-python /tmp/tp/bin/python
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from record import append_section, pyplot, save_figure

from titans_compose.builder import build
from titans_compose.train.data import WindowSampler, load_corpus
from titans_compose.train.loop import train
from titans_compose.train.run import evaluate
from titans_compose.train.tasks import Filler, exact_match, passkey_batch

HERE = Path(__file__).resolve().parent
SPECS = HERE.parent / "specs"
PLOT = HERE / "long_context.png"

WINDOW = 16
#: the same tiny size for every variant: width 64, 2 layers, 2 memory heads of 32, window 16, 16-token MAC segments
COMMON = ["model.dim=64", "blocks.0.repeat=2"]
MEMORY = ["memory.heads=2", "memory.head_dim=32", "memory.chunk_size=8"]
ATTENTION = ["attention.heads=2", f"attention.window={WINDOW}"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "MAC": ("titans_mac_small.yaml", [*COMMON, *MEMORY, *ATTENTION, f"mac.segment={WINDOW}"]),
    "MAG": ("titans_mag_small.yaml", [*COMMON, *MEMORY, *ATTENTION]),
    "MAL": ("titans_mal_small.yaml", [*COMMON, *MEMORY, *ATTENTION]),
    "LMM": ("titans_lmm_small.yaml", [*COMMON, *MEMORY]),
    "SWA": ("swa_baseline_small.yaml", [*COMMON, *ATTENTION]),
}
#: lucidrains' MemoryAsContextTransformer, trained in the interpreter given by --titans-python
TITANS_PYTORCH = "titans-pytorch"
TITANS_PYTORCH_LONGTERM_TOKENS = 4  # learned memory tokens per segment (its README example: 16 per 128-token segment)


class LogitsOutput(torch.nn.Module):
    """A model that returns a logits tensor, behind the ``model(tokens).logits`` interface the training loop and
    the scoring call."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.model(tokens))


def titans_pytorch_mac() -> torch.nn.Module:
    """titans-pytorch's MAC at this benchmark's size: width 64, 2 layers, each with a neural memory, attention of 2
    heads x 32 within 16-token segments, 4 persistent tokens, memory 2 heads x 32 with an MLP of depth 2 and
    expansion 4. Everything else (the memory's update rule with momentum, its chunk of one segment plus the
    memory tokens, the hyper-connections) is the library's default. Its memory's initial weights are one tensor
    expanded over the heads (stride 0), which an optimizer cannot update in place; they are made contiguous, so
    each head's copy trains on its own, as this package's per-head initial weights do."""
    from titans_pytorch import MemoryAsContextTransformer, MemoryMLP

    model = MemoryAsContextTransformer(
        num_tokens=256,
        dim=64,
        depth=2,
        segment_len=WINDOW,
        num_persist_mem_tokens=4,
        num_longterm_mem_tokens=TITANS_PYTORCH_LONGTERM_TOKENS,
        dim_head=32,
        heads=2,
        neural_memory_model=MemoryMLP(dim=32, depth=2, expansion_factor=4.0),
        neural_memory_kwargs={"heads": 2, "dim_head": 32},
    )
    for parameter in model.parameters():
        if 0 in parameter.stride():
            parameter.data = parameter.data.contiguous()
    return LogitsOutput(model)


def build_model(name: str, args: argparse.Namespace) -> torch.nn.Module:
    """A fresh model of variant ``name`` for seed ``args.seed``."""
    torch.manual_seed(args.seed)
    if name == TITANS_PYTORCH:
        return titans_pytorch_mac()
    spec, overrides = VARIANTS[name]
    return build(SPECS / spec, [*overrides, *args.set], seed=args.seed, smoke=False).module


def haystack(kind: str, text: torch.Tensor) -> Filler:
    """The pass key's filler: ``repeat`` (the task's sentences over and over), ``digits`` (random digits, distractor
    numbers) or ``text`` (random windows of ``text``, the corpus's training or validation bytes): text's written keys
    do not come back with a short period, as the repeated sentences' do."""
    return text if kind == "text" else kind


def validation_bits_per_byte(model: torch.nn.Module, val: WindowSampler, batches: int) -> float:
    """The mean next-byte loss of ``model`` over held-out batches 1..``batches`` of ``val``, in bits per byte: the
    validation ``titans-compose train`` reports (:func:`titans_compose.train.run.evaluate`)."""
    model.eval()
    with torch.no_grad():
        return evaluate(model, [val(i) for i in range(1, batches + 1)])["val_bits_per_byte"]


def pass_key_warmup(args: argparse.Namespace) -> int:
    """The pass-key run's warm-up steps: ``--warmup``, or a fifth of ``--steps`` (with a tenth, MAC's seed 0 sat at
    an answer loss of 1.8 from step 300 on; with a fifth it learned the task: RESULTS.md, 2026-12-04)."""
    return args.steps // 5 if args.warmup is None else args.warmup


def passkey_accuracy(
    model: torch.nn.Module, seq_len: int, digits: int, samples: int, seed: int, filler: Filler = "repeat"
) -> float:
    """Exact-match accuracy with the needle at the start of a ``seq_len``-token context (held-out seeds)."""
    correct = 0.0
    batch = 32
    for i in range(math.ceil(samples / batch)):
        seed_i = 10_000 + seed * 1000 + i
        task = passkey_batch(batch, seq_len, depth=0.0, digits=digits, filler=filler, seed=seed_i)
        with torch.no_grad():
            correct += exact_match(model(task.tokens).logits, task) * batch
    return correct / (math.ceil(samples / batch) * batch)


def run_in_titans_python(name: str, args: argparse.Namespace) -> dict:
    """:func:`run_variant` in the interpreter ``args.titans_python``, this file's directory and checkout first on
    its path, so it trains this checkout's loop; the result comes back as the worker's last line of JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    command = [args.titans_python, __file__, "--worker", name, "--worker-args", json.dumps(vars(args))]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{name} in {args.titans_python} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["accuracy"] = {int(n): acc for n, acc in result["accuracy"].items()}  # JSON keys are strings
    return result


def run_variant(name: str, args: argparse.Namespace) -> dict:
    if name == TITANS_PYTORCH and not args.worker:
        return run_in_titans_python(name, args)
    torch.set_num_threads(args.threads)
    progress = args.jobs == 1 and not args.worker
    model = build_model(name, args)
    params = sum(p.numel() for p in model.parameters())
    corpus = load_corpus(max_bytes=2_000_000)  # the text haystack's and the real-text copy's bytes
    train_filler = haystack(args.filler, corpus.train)

    def batches(step: int):
        seed = args.seed * 1_000_003 + step
        return passkey_batch(args.batch, args.train_len, digits=args.digits, filler=train_filler, seed=seed)

    started = time.perf_counter()
    result = train(model, batches, steps=args.steps, lr=args.lr, warmup=pass_key_warmup(args), progress=progress)
    minutes = (time.perf_counter() - started) / 60
    model.eval()
    val_filler = haystack(args.filler, corpus.val)
    accuracy = {n: passkey_accuracy(model, n, args.digits, args.samples, args.seed, val_filler) for n in args.lengths}
    curve = [(r.step, r.loss) for r in result.history]

    lm_model = build_model(name, args)
    sampler = WindowSampler(corpus.train, args.batch, args.train_len, seed=args.seed)
    train(lm_model, sampler, steps=args.lm_steps, lr=args.lr, warmup=args.lm_steps // 10, progress=progress)
    val = WindowSampler(corpus.val, args.batch, args.train_len, seed=args.seed, stream="val")
    return {
        "params": params,
        "minutes": minutes,
        "accuracy": accuracy,
        "curve": curve,
        "bpb": validation_bits_per_byte(lm_model, val, 8),
    }


def plot(results: dict[str, dict], lengths: list[int], digits: int) -> str:
    plt = pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        left.plot(lengths, [r["accuracy"][n] for n in lengths], marker="o", label=name)
        steps, losses = zip(*r["curve"], strict=True)
        right.plot(steps, losses, label=name)
    left.axhline(10.0**-digits, color="grey", linestyle=":", label="chance")
    left.set(xlabel="context length (needle at the start)", ylabel="pass-key exact match", ylim=(-0.02, 1.02))
    left.set_title(f"pass key beyond a {WINDOW}-token window")
    right.set(xlabel="training step", ylabel="answer loss (nats)", yscale="log")
    right.set_title("training curve")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, PLOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=[*VARIANTS, TITANS_PYTORCH], help="variants to train"
    )
    parser.add_argument("--steps", type=int, default=1500, help="pass-key training steps per variant")
    parser.add_argument("--lm-steps", type=int, default=150, help="real-text training steps per variant")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-len", type=int, default=128, help="training context length")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256], help="evaluated context lengths")
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument(
        "--filler",
        choices=["repeat", "digits", "text"],
        default="repeat",
        help="the haystack: the repeated sentences, random digits, or source text (held-out files when scoring)",
    )
    parser.add_argument("--samples", type=int, default=256, help="evaluation sequences per length")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, help="pass-key warm-up steps (default: a fifth of --steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at once, each in its own process")
    parser.add_argument(
        "--set", action="append", default=[], metavar="PATH=VALUE", help="a spec override for every variant run"
    )
    parser.add_argument(
        "--no-record", action="store_true", help="do not write the plot or append to benchmarks/RESULTS.md"
    )
    parser.add_argument(
        "--titans-python",
        default=os.environ.get("TITANS_PYTORCH_PYTHON"),
        help=f"interpreter with titans-pytorch installed, for the {TITANS_PYTORCH} variant (see above)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # run this one variant here and print its result
    parser.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_args = argparse.Namespace(**{**json.loads(args.worker_args), "worker": args.worker})
        print(json.dumps(run_variant(args.worker, worker_args)))
        return
    if TITANS_PYTORCH in args.variants and not args.titans_python:
        parser.error(f"the {TITANS_PYTORCH} variant needs --titans-python (or TITANS_PYTORCH_PYTHON): see --help")
    if min(args.lengths) < 4 * WINDOW:
        parser.error(f"every evaluated length must put the needle at least 4x the window ({4 * WINDOW}) away")
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {name: pool.submit(run_variant, name, args) for name in args.variants}
        results = {name: f.result() for name, f in tqdm(futures.items(), desc="variants", unit="variant")}
    header = (
        "| variant | parameters | train min | "
        + " | ".join(f"acc @ {n}" for n in args.lengths)
        + " | final answer loss | val bits/byte |"
    )
    lines = [header, "|" + "|".join(["---"] * (5 + len(args.lengths))) + "|"]
    for name, r in results.items():
        accs = " | ".join(f"{r['accuracy'][n]:.2f}" for n in args.lengths)
        final = sum(loss for _, loss in r["curve"][-20:]) / len(r["curve"][-20:])
        lines.append(f"| {name} | {r['params']:,} | {r['minutes']:.1f} | {accs} | {final:.3f} | {r['bpb']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.no_record:
        return
    print(plot(results, args.lengths, args.digits))
    reference = (
        f" {TITANS_PYTORCH}: lucidrains' MemoryAsContextTransformer (titans_pytorch_mac() in the script: the same "
        f"width, layers, segments, persistent tokens and memory size, its default memory rule with momentum, "
        f"{TITANS_PYTORCH_LONGTERM_TOKENS} memory tokens per segment), the same loop, batches and scoring."
        if TITANS_PYTORCH in results
        else ""
    )
    body = (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.jobs} variants at "
        f"once with {args.threads} thread(s) each.  \n"
        f"Models: width 64, 2 layers, attention window {WINDOW} (MAC segments {WINDOW}), memory 2 heads x 32, depth 2, "
        f"chunk 8, each variant's inner step as its spec sets it (MAG, MAL, LMM: EMA momentum, theta / head_dim; MAC: "
        f"the paper's momentum from eta 0.5, inner gradient clip 1); {args.steps} pass-key steps of "
        f"{args.batch} x {args.train_len} tokens ({args.digits}-digit keys, "
        f"needle anywhere, loss on the answer, filler: {args.filler}), lr {args.lr}, warm-up "
        f"{pass_key_warmup(args)} steps. "
        f"Accuracy: exact match over {args.samples} held-out "
        f"sequences with the needle at the start (chance {10.0**-args.digits:g}). Val bits/byte: a separate copy "
        f"trained {args.lm_steps} steps on the standard library's source.{reference}\n\n{table}"
    )
    append_section("Pass-key retrieval beyond the window, and real-text loss", __file__, body)


if __name__ == "__main__":
    main()
