"""Context parallelism (titans_compose.nn.context, TitansLM.split_sequence) on two gloo processes against one process.

Each of 2 ranks holds half of every row's tokens. The exchange is checked as pure data movement (exact); the models
of every block kind (tiny versions of the shipped specs: memory heads 2, attention heads 4, so 1 and 2 per rank) in
float64 against the same model in one process: each rank's logits are the one-process logits of its tokens, the
ranks' losses add up to the one-process loss, and their gradients add up to its gradients. The sequence of 20
tokens splits at 10, so a MAC segment (8) and a memory chunk (4) straddle the split, and MAL's 4 persistent tokens
sit on the first rank only. A run whose ranks take each other's heads must fail the same comparison. A memory that
diverges stops every rank, and the earliest token the ranks name is the one-process model's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.helpers import DIVERGING, SPECS, TINY_SHIPPED, on_gloo_ranks
from titans_compose.builder import build
from titans_compose.graph import blocks as B
from titans_compose.graph import compile_graph
from titans_compose.nn.context import ContextGroup, Spread, to_heads, to_sequence
from titans_compose.nn.model import TitansLM
from titans_compose.ops.memory.finite import MemoryDivergedError
from titans_compose.registry import new_registry
from titans_compose.spec import load_spec

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
RANKS, ROWS, LENGTH = 2, 2, 20
TINY = [*TINY_SHIPPED, "blocks.0.repeat=2"]
#: (spec, extra overrides) of every model kind; LMM again with per-chunk gates, whose chunk means straddle the split
MODELS = {
    "mac": ("titans_mac_small.yaml", []),
    "mag": ("titans_mag_small.yaml", []),
    "mal": ("titans_mal_small.yaml", []),
    "lmm": ("titans_lmm_small.yaml", []),
    "lmm_per_chunk_gates": (
        "titans_lmm_small.yaml",
        ["update.lr.gate=per_chunk", "update.momentum.gate=per_chunk", "update.forget.gate=per_chunk"],
    ),
    "swa": ("swa_baseline_small.yaml", []),
}
#: float64; the split computes the same values except for the order of sums: the token-wise matmuls run over half
#: the rows, and each gradient is the sum of the ranks' shares. Observed differences are below 1e-14 (relative to
#: the largest entry); a wrong exchange or head assignment is off by order 1.
TOLERANCE = 1e-12
DIVERGING_LENGTH = 300


def tiny(kind: str) -> TitansLM:
    """The float64 model of ``kind``, the same in every process, with random gate projections (they start at zero,
    which would leave the gate logits' exchange untested)."""
    spec, extra = MODELS[kind]
    model = build(SPECS / spec, [*TINY, *extra], seed=0, smoke=False).module.to(F64)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_gate.proj" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=F64))
    return model


def tokens(length: int = LENGTH) -> torch.Tensor:
    return torch.randint(256, (ROWS, length), generator=torch.Generator().manual_seed(1))


def loss_of(logits: torch.Tensor, start: int) -> torch.Tensor:
    """The next-token loss of the logits of tokens ``start`` onwards, as a share of the whole sequence's mean."""
    targets = tokens()[:, start + 1 : start + logits.shape[1] + 1]
    share = F.cross_entropy(logits[:, : targets.shape[1]].flatten(0, 1), targets.flatten(), reduction="sum")
    return share / (ROWS * (LENGTH - 1))


@dataclasses.dataclass(frozen=True)
class SwappedHeads(ContextGroup):
    """A context group whose ranks compute each other's heads: the exchange still sends head group j to rank j."""

    def heads(self, total: int, what: str) -> slice:
        mine = super().heads(total, what)
        share = mine.stop - mine.start
        other = (self.rank + 1) % self.size
        return slice(other * share, (other + 1) * share)


def _split_models(rank: int, world: int, out: str) -> None:
    """Every model kind split over the ranks: this rank's logits and loss, and its gradients (zero where a
    parameter had none), properly split and with the heads swapped."""
    group = dist.new_group(list(range(world)))
    piece = LENGTH // world
    results = {}
    contexts = {"split": ContextGroup(group, rank, world), "swapped": SwappedHeads(group, rank, world)}
    for kind in MODELS:
        for name, context in contexts.items():
            model = tiny(kind)
            model.split_sequence(context)
            logits = model(tokens()[:, rank * piece : (rank + 1) * piece]).logits
            loss = loss_of(logits, rank * piece)
            loss.backward()
            grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}
            results[kind, name] = {"logits": logits.detach(), "loss": loss.detach(), "grads": grads}
    torch.save(results, f"{out}-{rank}.pt")


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("context") / "models"
    on_gloo_ranks(_split_models, RANKS, str(out))
    return [torch.load(f"{out}-{rank}.pt") for rank in range(RANKS)]


def whole(kind: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The one-process logits, loss and gradients."""
    model = tiny(kind)
    logits = model(tokens()).logits
    loss = loss_of(logits, 0)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def errors(runs: list[dict], kind: str, name: str) -> dict[str, float]:
    """The largest relative difference of the split runs' logits, loss and every gradient from one process's."""
    logits, loss, grads = whole(kind)
    parts = [run[kind, name] for run in runs]
    found = {
        "logits": relative(torch.cat([p["logits"] for p in parts], 1), logits),
        "loss": relative(sum(p["loss"] for p in parts), loss),
    }
    assert set(parts[0]["grads"]) >= set(grads)  # every parameter with a gradient in one process
    for param, grad in grads.items():
        found[param] = relative(sum(p["grads"][param] for p in parts), grad)
    return found


@pytest.mark.parametrize("kind", MODELS)
def test_a_model_split_over_two_ranks_computes_what_one_process_does(split_runs: list[dict], kind: str) -> None:
    found = errors(split_runs, kind, "split")
    assert max(found.values()) < TOLERANCE, {k: v for k, v in found.items() if v >= TOLERANCE}
    assert len(found) > 2 + 10  # logits, loss and the gradients of many parameters were compared


@pytest.mark.parametrize("kind", ["mac", "mal", "lmm"])
def test_ranks_computing_each_others_heads_fail_the_comparison(split_runs: list[dict], kind: str) -> None:
    """The comparison above can fail: with the head assignment swapped, the ranks apply one share's per-head
    parameters (initial memory weights, convolution) to another share's tokens."""
    assert errors(split_runs, kind, "swapped")["logits"] > 1e-3


def _exchanges(rank: int, world: int, out: str) -> None:
    """to_heads and to_sequence of this rank's tokens of a global tensor, for several spreads of its tokens, and the
    gradient of this rank's tokens from a weighted sum of the exchanged values; the group's gather and sum."""
    group = ContextGroup(dist.new_group(list(range(world))), rank, world)
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2, 7, 4, 3, generator=generator, dtype=F64)
    weights = torch.randn(2, 7, 4, 3, generator=generator, dtype=F64)
    results = {}
    for lengths in ((3, 4), (7, 0), (0, 7)):
        spread = Spread(group, lengths, 0)
        begin = sum(lengths[:rank])
        mine = values[:, begin : begin + lengths[rank]].clone().requires_grad_()
        heads = group.heads(4, "the test")
        # two dtypes: one all-to-all each
        moved, moved32 = to_heads([mine, mine.float()[..., :2]], spread)
        ((moved * weights[:, :, heads]).sum() + moved32.sum()).backward()
        results[lengths] = {
            "moved": moved.detach(),
            "moved32": moved32.detach(),
            "back": to_sequence(moved, spread).detach(),
            "grad": mine.grad,
        }
    results["gathered"] = group.gather(values[:, 3 * rank : 3 * rank + 3])
    results["summed"] = group.sum(torch.tensor([rank, 1.0]))
    torch.save(results, f"{out}-{rank}.pt")


def test_the_exchange_moves_tokens_to_heads_and_back_with_its_gradient(tmp_path: Path) -> None:
    on_gloo_ranks(_exchanges, RANKS, str(tmp_path / "exchange"))
    runs = [torch.load(tmp_path / f"exchange-{rank}.pt") for rank in range(RANKS)]
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2, 7, 4, 3, generator=generator, dtype=F64)
    weights = torch.randn(2, 7, 4, 3, generator=generator, dtype=F64)
    for lengths in ((3, 4), (7, 0), (0, 7)):
        for rank, run in enumerate(runs):
            got, begin = run[lengths], sum(lengths[:rank])
            tokens_of_rank, heads_of_rank = slice(begin, begin + lengths[rank]), slice(2 * rank, 2 * rank + 2)
            assert torch.equal(got["moved"], values[:, :, heads_of_rank])
            assert torch.equal(got["moved32"], values.float()[:, :, heads_of_rank, :2])
            assert torch.equal(got["back"], values[:, tokens_of_rank])
            expected = weights[:, tokens_of_rank].clone()
            expected[..., :2] += 1
            assert torch.equal(got["grad"], expected)
    for run in runs:  # what evaluation shares: the ranks' pieces laid end to end, and sums
        assert torch.equal(run["gathered"], values[:, :6])
        assert run["summed"].tolist() == [1.0, 2.0]


def diverging_model() -> TitansLM:
    """LMM with a rule whose memory diverges within 300 tokens (float32), the same in every process."""
    return build(SPECS / "titans_lmm_small.yaml", [*TINY, *DIVERGING], seed=0, smoke=False).module


def _diverged(rank: int, world: int, out: str) -> None:
    """The error of this rank's half of a diverging forward: every rank must raise (none may wait for the others in
    a later exchange), naming the layer, and the token where its own heads diverge."""
    model = diverging_model()
    model.split_sequence(ContextGroup(dist.new_group(list(range(world))), rank, world))
    piece = DIVERGING_LENGTH // world
    try:
        model(tokens(DIVERGING_LENGTH)[:, rank * piece : (rank + 1) * piece])
    except MemoryDivergedError as exc:
        Path(f"{out}-{rank}.json").write_text(json.dumps([exc.layer, exc.token, str(exc)]))


def test_a_diverging_memory_stops_every_rank(tmp_path: Path) -> None:
    with pytest.raises(MemoryDivergedError) as whole:
        diverging_model()(tokens(DIVERGING_LENGTH))
    on_gloo_ranks(_diverged, RANKS, str(tmp_path / "diverged"))
    raised = [json.loads((tmp_path / f"diverged-{rank}.json").read_text()) for rank in range(RANKS)]
    first = min((token, layer) for layer, token, _ in raised if token is not None)
    assert first == (whole.value.token, whole.value.layer) and 0 < first[0] < DIVERGING_LENGTH


# ------------------------------------------------------------------------------ what cannot be split, refused


def test_heads_that_do_not_split_are_named() -> None:
    model = build(SPECS / "titans_mac_small.yaml", [*TINY, "memory.heads=3", "attention.heads=2"], smoke=False).module
    assert model.context_parallel_problems(2) == [
        "L0.memory.read_ctx has 3 heads, which do not split over 2 ranks",
        "L0.memory has 3 heads, which do not split over 2 ranks",
        "L1.memory.read_ctx has 3 heads, which do not split over 2 ranks",
        "L1.memory has 3 heads, which do not split over 2 ranks",
    ]
    assert "L0.attention has 2 heads, which do not split over 4 ranks" in model.context_parallel_problems(4)
    with pytest.raises(ValueError, match=r"over 2 ranks: L0\.memory\.read_ctx has 3 heads"):
        model.split_sequence(ContextGroup(None, 0, 2))
    assert model.context is None


def _conv_mixer(ctx: B.LowerContext, x: str) -> str:
    h = B._norm(ctx, "norm_mix", x)
    c = ctx.add("conv", "conv", "norm", {"x": h}, features=ctx.model.dim, kernel=3)
    return B._mlp_sublayer(ctx, ctx.add("add_mix", "add", "norm", {"a": x, "b": c}))


def test_a_node_that_mixes_tokens_without_heads_is_refused(tmp_path: Path) -> None:
    registry = new_registry()
    registry.register("block", "conv_mixer", B.BlockKind(("mlp", "norm"), _conv_mixer), description="a convolution")
    spec = tmp_path / "conv.yaml"
    spec.write_text("name: conv\nmodel: {vocab_size: 16, dim: 8}\nblocks:\n  - kind: conv_mixer\n")
    loaded = load_spec(spec, [], registry=registry)
    model = TitansLM.from_graph(compile_graph(loaded)[0], loaded)
    problems = model.context_parallel_problems(2)
    assert problems == ["L0.conv (conv) mixes tokens and has no heads to split over the ranks"]


def test_a_split_model_runs_whole_streams_only() -> None:
    """A split model refuses what would continue a stream or restart it inside a call (before any exchange)."""
    model = tiny("lmm")
    state = model(tokens()).state
    model.split_sequence(ContextGroup(None, 0, 2))
    with pytest.raises(ValueError, match="no state, no cu_seqlens"):
        model(tokens()[:, :10], state)
    with pytest.raises(ValueError, match="no state, no cu_seqlens"):
        model(tokens()[:1, :10], cu_seqlens=[0, 4, 10])
    with pytest.raises(ValueError, match="generation continues a stream"):
        model.generate(tokens()[:, :10], 2)
    model.split_sequence(None)
    assert model(tokens()).state is not None
