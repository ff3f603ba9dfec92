"""The inner step's parametrisations (issue 17): ``update.momentum.form: ema`` and ``update.lr.scale: head_dim`` are
transforms of theta before the scan. Each is checked against the paper's form run by hand on the transformed gates
with the sequential reference (float64, forward and every parameter's gradient), by the property it is for (the
EMA form's cumulative step of one gradient is theta, the paper's theta / (1 - eta)). Streaming with per-chunk gates,
whose pending tokens' theta depends on their chunk's mean eta in the EMA form, is checked with the other gates in
tests/nn/test_neural_memory.py."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import F64, build_memory, randomise_gates, rel, x_of
from titans_compose.ops.memory.reference import reference_memory

FORMS = [("paper", "none"), ("ema", "none"), ("paper", "head_dim"), ("ema", "head_dim")]


def rows(z: torch.Tensor) -> torch.Tensor:
    """[B, T, H] -> [B*H, T]"""
    return z.transpose(1, 2).reshape(-1, z.shape[1])


def by_hand(module, x: torch.Tensor, form: str, scale: str) -> torch.Tensor:
    """The module's output for ``x`` from its parts, written out: the paper's scan (the sequential reference) given
    theta = max_lr sigmoid(z) (/ d), times (1 - eta) for the EMA form."""
    every = slice(0, module.heads)
    q, k, v = (module._mix(role, module._features(role, x), every, None, {}) for role in ("q", "k", "v"))
    theta = module.max_lr * torch.sigmoid(rows(module.lr_gate(x)))
    if scale == "head_dim":
        theta = theta / module.head_dim
    eta = torch.sigmoid(rows(module.momentum_gate(x)))
    if form == "ema":
        theta = theta * (1 - eta)
    keep = torch.sigmoid(-rows(module.forget_gate(x)))
    memory = module.initial_state(x.shape[0]).memory
    y, _ = reference_memory(q, k, v, theta, eta.log(), keep.log(), memory, module.config)
    return module._readout(module._returned(y, x.shape[0], every, None), x)


@pytest.mark.parametrize(("form", "scale"), FORMS)
def test_a_form_is_the_paper_scan_on_transformed_gates(form, scale):
    """Outputs and the gradients of every parameter (the gates' included, which the EMA factor makes the lr depend
    on eta) equal the hand-written composition to 1e-10 relative (the module runs the chunked backend: summation
    order only). The EMA and head_dim forms differ from the paper's by far more (> 1e-2): the check can fail."""
    overrides = [f"update.momentum.form={form}", f"update.lr.scale={scale}", "memory.chunk_size=3"]
    module = build_memory(overrides)
    randomise_gates(module)
    x = x_of(11)
    u = torch.randn(2, 11, 24, dtype=F64, generator=torch.Generator().manual_seed(5))
    params = [p for p in module.parameters() if p.requires_grad]
    outs = {"module": module(x)[0], "by hand": by_hand(module, x, form, scale)}
    assert rel(outs["module"], outs["by hand"]) < 1e-10
    grads = {name: torch.autograd.grad((out * u).sum(), params) for name, out in outs.items()}
    for got, want in zip(grads["module"], grads["by hand"], strict=True):
        assert rel(got, want) < 1e-10 if want.norm() > 0 else got.norm() == 0
    if (form, scale) != ("paper", "none"):
        assert rel(outs["module"], by_hand(module, x, "paper", "none")) > 1e-2


@pytest.mark.parametrize("form", ["paper", "ema"])
def test_one_gradients_cumulative_step(form):
    """A matrix memory (no residual, no LayerNorm, no forgetting, chunk 1) that writes token 0 only (theta ~1e-35
    on the other 399 tokens) and keeps its momentum at eta = 0.9: after 400 tokens (0.9^400 ~ 5e-19) the weights
    have moved by -theta_0 g_0 in the EMA form and by -theta_0 g_0 / (1 - eta) = -10 theta_0 g_0 in the paper's,
    g_0 = 2 (W_0 k_0 - v_0) k_0^T. Float64, 1e-10 relative (the forms differ by 10x)."""
    overrides = [
        *("memory.depth=1", "memory.residual=false", "memory.output_norm=false", "memory.chunk_size=1"),
        *("update.forget=off", "update.lr.init=0.05", f"update.momentum.form={form}"),
    ]
    module = build_memory(overrides)
    x = x_of(400)
    x[:, :, 0] = 0.0
    x[:, 0, 0] = 1.0
    with torch.no_grad():  # lr logit: the initial one on token 0, 80 below it elsewhere
        module.lr_gate.proj.weight[:, 0] = 80.0
        module.lr_gate.bias -= 80.0
    w0 = module.initial_state(2).memory.weights[0]
    _, state, call = module.step(x)
    k0, v0 = call.k[:, 0], call.v[:, 0]
    g0 = 2 * torch.einsum("ni,nj->nij", torch.einsum("nij,nj->ni", w0, k0) - v0, k0)
    # the gates' actual values (their biases are float32 numbers, 0.05 and 0.9 to ~4e-8)
    theta0 = module.max_lr * torch.sigmoid(module.lr_gate(x)[0, 0, 0]).item()
    eta = torch.sigmoid(module.momentum_gate.bias[0]).item()
    assert abs(theta0 - 0.05) < 1e-8 and abs(eta - 0.9) < 1e-8
    steps = {"ema": 1.0, "paper": 1 / (1 - eta)}
    assert rel(state.memory.weights[0] - w0, -theta0 * steps[form] * g0) < 1e-10


def test_the_transform_keeps_theta_in_log_space_safe():
    """An eta gate at its extremes (logits +-60) gives a finite theta: 1 - eta is computed as -expm1(log eta)
    (1 - exp(log eta) would be 0 at eta = 1 - 1e-26 and lose every digit near it)."""
    module = build_memory(["update.momentum.form=ema"])
    with torch.no_grad():
        module.momentum_gate.bias.fill_(60.0)
    theta = module.gates(x_of(5)).theta
    assert torch.isfinite(theta).all() and (theta > 0).all()
    raw = module.max_lr * torch.sigmoid(module.lr_gate.bias[0])  # 0.1 to the float32 bias's ~3e-9
    assert rel(theta, (raw * torch.sigmoid(torch.tensor(-60.0, dtype=F64))).expand_as(theta)) < 1e-12
