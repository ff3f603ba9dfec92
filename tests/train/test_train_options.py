"""Train options that change how a step is computed but not what it computes: gradient accumulation, activation
checkpointing per layer and torch.compile, each against the plain step."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import SPECS
from titans_compose.builder import build
from titans_compose.train import Batch, train
from titans_compose.train.prepare import checkpoint_layers

pytestmark = pytest.mark.usefixtures("one_thread")

NARROW = ["model.dim=32", "memory.head_dim=16", "memory.heads=1", "attention.heads=2", "blocks.0.repeat=1"]
SHIPPED = ["titans_mac_small.yaml", "titans_mag_small.yaml", "titans_mal_small.yaml", "titans_lmm_small.yaml"]


def tiny_model(spec: str = "titans_lmm_small.yaml", extra: tuple[str, ...] = ()) -> torch.nn.Module:
    return build(SPECS / spec, [*NARROW, *extra], seed=0, smoke=False).module


def masked_source(rows: int, length: int = 24) -> object:
    """Batches whose loss masks select a different number of targets in every row (so micro-batch means differ
    from the batch mean), each a function of the step."""

    def make(step: int) -> Batch:
        gen = torch.Generator().manual_seed(step)
        tokens = torch.randint(256, (rows, length), generator=gen)
        mask = torch.rand(rows, length, generator=gen) < torch.linspace(0.1, 0.9, rows)[:, None]
        mask[:, 1] = True  # every row has a target
        return Batch(tokens, mask)

    return make


@pytest.mark.parametrize("accumulate", [2, 4])
def test_accumulated_micro_batches_take_the_whole_batch_step(accumulate: int) -> None:
    """K micro-batches of B/K rows give the step of one batch of B rows: the loss is the mean over every target of
    the batch (not a mean of micro-batch means, which differ with unequal masks). float64, so the only difference is
    the order of the sums: 1e-10 relative."""
    runs = []
    for k in (1, accumulate):
        model = tiny_model().double()
        result = train(model, masked_source(4), steps=3, lr=3e-3, progress=False, accumulate=k)
        runs.append(([r.loss for r in result.history], torch.cat([p.detach().flatten() for p in model.parameters()])))
    (loss1, weights1), (loss_k, weights_k) = runs
    assert loss_k == pytest.approx(loss1, rel=1e-10)
    torch.testing.assert_close(weights_k, weights1, rtol=1e-9, atol=1e-12)
    assert not torch.equal(weights1, torch.cat([p.detach().flatten() for p in tiny_model().double().parameters()]))


def test_accumulation_needs_rows_that_split_evenly() -> None:
    with pytest.raises(ValueError, match="does not split into 1 ranks x 3 micro-batches"):
        train(tiny_model(), masked_source(4), steps=1, progress=False, accumulate=3)
    with pytest.raises(ValueError, match="accumulate >= 1"):
        train(tiny_model(), masked_source(4), steps=1, progress=False, accumulate=0)


def _grads(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Logits of two calls that continue one stream (so the second starts from memory states), the gradients of a
    loss on both, and the bytes autograd kept for the backward pass."""
    kept = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        first = model(tokens[:, :20])
        second = model(tokens[:, 20:], first.state)
    logits = torch.cat([first.logits, second.logits], 1)
    (logits.square().mean() + logits[:, -1].sum()).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, kept


@pytest.mark.parametrize("spec", SHIPPED)
def test_activation_checkpointing_gives_the_same_gradients(spec: str) -> None:
    """Recomputing each layer in the backward pass runs the same kernels on the same inputs, so the gradients are
    identical (float64, 1e-12 absolute); the stream is continued from a state so that recomputation must start
    from the layer's states before the call, not after it; and it keeps fewer bytes for the backward pass."""
    tokens = torch.randint(256, (2, 37), generator=torch.Generator().manual_seed(3))
    plain = tiny_model(spec).double()
    logits, grads, kept = _grads(plain, tokens)
    checked = tiny_model(spec).double()
    checkpoint_layers(checked)
    logits_ck, grads_ck, kept_ck = _grads(checked, tokens)
    torch.testing.assert_close(logits_ck, logits, rtol=0, atol=1e-12)
    assert grads_ck.keys() == grads.keys() and len(grads) > 5
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], rtol=0, atol=1e-12, msg=name)
    assert kept_ck < 0.8 * kept, (kept_ck, kept)


def test_activation_checkpointing_needs_a_titans_model() -> None:
    with pytest.raises(ValueError, match="a Linear has no layers to run"):
        checkpoint_layers(torch.nn.Linear(2, 2))


def _compile_problem() -> str | None:
    if not (shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")):
        return "torch.compile on the CPU needs a C compiler (gcc, cc or clang) and none is on PATH"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_compile_problem() is not None, reason=str(_compile_problem()))
def test_compiled_train_steps_match_eager(tmp_path: Path) -> None:
    """Three training steps with the model compiled equal the eager ones: same losses within 1e-4 relative and
    weights within 1e-4 (float32: inductor fuses and reorders the floating-point operations)."""
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = tiny_model("titans_mac_small.yaml")
        result = train(model, masked_source(2, 32), steps=3, lr=3e-3, progress=False, compile=compiled)
        runs.append(([r.loss for r in result.history], torch.cat([p.detach().flatten() for p in model.parameters()])))
    (eager_loss, eager_w), (compiled_loss, compiled_w) = runs
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-4)
    torch.testing.assert_close(compiled_w, eager_w, rtol=1e-4, atol=1e-4)
