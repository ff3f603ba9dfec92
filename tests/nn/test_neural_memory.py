"""NeuralMemory, the module: built from spec sections, backend choice, gate granularities against the reference,
streaming (pieces, one token at a time, convolution history), document boundaries, gradients to every parameter,
checkpointing, and finiteness on long and extreme inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers import (
    DIVERGING,
    F64,
    SPECS,
    assert_same_memory_state,
    build_memory,
    randomise_gates,
    rel,
    stream,
    x_of,
)
from titans_compose.nn import NeuralMemory
from titans_compose.ops.memory.dispatch import ENV_VAR, choose_backend
from titans_compose.ops.memory.finite import MemoryDivergedError
from titans_compose.registry import new_registry
from titans_compose.spec import load_spec


@pytest.mark.parametrize(
    "spec", ["titans_lmm_small.yaml", "titans_mac_small.yaml", "titans_mag_small.yaml", "titans_mal_small.yaml"]
)
def test_builds_from_every_memory_spec(spec):
    registry = new_registry()
    loaded = load_spec(SPECS / spec, registry=registry)
    torch.manual_seed(0)
    module = NeuralMemory.from_block(loaded.spec.blocks[0], loaded.spec.model, registry)
    y, state = module(torch.randn(1, 20, loaded.spec.model.dim))
    assert y.shape == (1, 20, loaded.spec.model.dim) and torch.isfinite(y).all()
    assert module.config.layer_shapes == ((256, 64), (64, 256))
    assert state.memory.pending_len == 20 % module.config.chunk_size


def test_backend_choice_says_why(monkeypatch):
    assert choose_backend().name == "auto" and "CUDA" in choose_backend().reason
    module = build_memory()
    assert module.choice.name == "auto"  # resolved at the first call, from the tensors' device
    module(x_of(5))
    assert module.choice.name == "chunked" and module.choice.reason.startswith("cpu tensors run the chunked")
    assert "would run chunked too (inputs of dtype float64" in module.choice.reason
    module.float()(x_of(5, dtype=torch.float32))
    assert "on CUDA this layer would run the generated kernel" in module.choice.reason
    monkeypatch.setenv(ENV_VAR, "reference")
    choice = choose_backend()
    assert choice.name == "reference" and ENV_VAR in choice.reason
    assert build_memory().choice.name == "reference"
    with pytest.raises(ValueError, match="unknown memory backend"):
        choose_backend("cuda-magic")


@pytest.mark.parametrize("granularity", ["per_token", "per_chunk", "constant"])
@pytest.mark.parametrize("retrieval", ["after", "per_chunk"])
def test_module_backends_agree_for_every_gate_granularity(granularity, retrieval):
    overrides = [f"update.{g}.gate={granularity}" for g in ("lr", "momentum", "forget")]
    overrides.append(f"memory.retrieval={retrieval}")
    chunked, reference = build_memory(overrides), build_memory(overrides, backend="reference")
    randomise_gates(chunked)
    reference.load_state_dict(chunked.state_dict())
    x = x_of(19)
    assert rel(chunked(x)[0], reference(x)[0]) < 1e-10


def test_per_chunk_gates_are_constant_within_a_chunk():
    module = build_memory(["update.forget.gate=per_chunk", "update.lr.gate=per_chunk"])
    randomise_gates(module)
    gates = module.gates(x_of(10))
    for series in (gates.theta, gates.log_keep):
        chunks = series.split(4, dim=1)  # chunk 4: tokens 0-3, 4-7, 8-9
        assert all(torch.allclose(c, c[:, :1].expand_as(c)) for c in chunks)
        assert not torch.allclose(chunks[0][:, 0], chunks[1][:, 0])


def test_per_chunk_gates_are_float64_means():
    """Per-chunk gates in a float64 module are the chunk means of the per-token gate values to rounding (1e-14
    relative): a float32 step anywhere (e.g. the log of an integer count, which torch computes in float32) is off
    by ~1e-8. Chunk 4 over 6 + 5 tokens: full chunks, a chunk split between the calls, a partial last chunk."""
    module = build_memory([f"update.{g}.gate=per_chunk" for g in ("lr", "momentum", "forget")])
    randomise_gates(module)
    x = x_of(11)
    values = {  # per-token gate values [B, T, H]: theta, eta, 1 - alpha
        "theta": module.max_lr * torch.sigmoid(module.lr_gate(x)),
        "log_eta": torch.sigmoid(module.momentum_gate(x)),
        "log_keep": torch.sigmoid(-module.forget_gate(x)),
    }
    _, state = module(x[:, :6])
    first, second = module.gates(x[:, :6]), module.gates(x[:, 6:], state)
    for name, per_token in values.items():
        means = torch.cat([c.mean(1, keepdim=True).expand_as(c) for c in per_token.split(4, 1)], 1)
        want = means.transpose(1, 2).reshape(-1, 11)
        got = torch.cat([getattr(first, name)[:, :4], getattr(second.memory.pending, name), getattr(second, name)], 1)
        assert got.dtype == F64
        assert rel(got if name == "theta" else got.exp(), want) < 1e-14, name


def test_gate_initial_values_follow_the_spec():
    module = build_memory(["update.forget.half_life=100", "update.lr.init=0.05", "update.momentum.init=0.8"])
    gates = module.gates(x_of(3))
    theta, log_eta, log_keep = gates.theta, gates.log_eta, gates.log_keep
    assert torch.allclose(theta, torch.full_like(theta, 0.05))
    assert torch.allclose(log_eta.exp(), torch.full_like(log_eta, 0.8))
    assert torch.allclose(log_keep.exp(), torch.full_like(log_keep, 2 ** (-1 / 100)))  # alpha_0 = 1 - 2^(-1/100)


@pytest.mark.parametrize("cuts", [[7, 1, 11], [1] * 19, [4, 15]])
def test_streaming_equals_one_call(cuts):
    """Pieces of any length (one token at a time included) carry the memory and the convolution history."""
    module = build_memory(["update.lr.gate=constant"])
    randomise_gates(module)
    x = x_of(sum(cuts))
    whole, _ = module(x)
    outs, state, start = [], None, 0
    for n in cuts:
        y, state = module(x[:, start : start + n], state)
        outs.append(y)
        start += n
    assert rel(torch.cat(outs, 1), whole) < 1e-10


@pytest.mark.parametrize("form", ["paper", "ema"])
@pytest.mark.parametrize("gate", ["lr", "momentum", "forget", "lr momentum"])
@pytest.mark.parametrize("retrieval", ["per_chunk", "after", "before"])
def test_streaming_with_a_per_chunk_gate(gate, retrieval, form):
    """A per-chunk gate is the mean over its chunk, which a call ending mid-chunk has only partly seen: the earlier
    tokens' gate values travel in the state, so a chunk completed in a later call is folded with the mean one call
    takes (the state equals one call's) and every piece's output equals one call's over the stream up to the
    piece's end. With per-chunk retrieval a token reads only completed chunks, so the pieces equal one call over the
    whole stream. With after / before, one call's output at a token already reads the mean over the later tokens of
    its chunk (the spec warns, TCW03); no stream can know those before they come, so only pieces ending on a chunk
    boundary (8 and 16 here, chunk 4) match the whole stream's outputs, and with per-chunk retrieval the gates'
    gradients through the pieces are one call's. In the EMA momentum form (update.momentum.form) a pending token's
    theta carries its chunk's mean eta, so with a per-chunk momentum gate the lr gate's values travel too. Float64;
    1e-10 covers summation order."""
    overrides = [f"update.{g}.gate=per_chunk" for g in gate.split()]
    module = build_memory([*overrides, f"memory.retrieval={retrieval}", f"update.momentum.form={form}"])
    randomise_gates(module)
    cuts = [6, 2, 3, 5, 3]
    x = x_of(sum(cuts))
    whole, whole_state = module(x)
    outs, state = stream(module, x, cuts)
    assert_same_memory_state(state, whole_state, tol=1e-10)
    end = 0
    for n, y in zip(cuts, outs, strict=True):
        end += n
        assert rel(y, module(x[:, :end])[0][:, end - n :]) < 1e-10, end
        if retrieval == "per_chunk" or end % 4 == 0:
            assert rel(y, whole[:, end - n : end]) < 1e-10, end
    nxt = x_of(5, seed=7)  # the carried states continue alike
    assert rel(module(nxt, state)[0], module(nxt, whole_state)[0]) < 1e-10
    if retrieval == "per_chunk":
        weights = [g.proj.weight for g in (module.lr_gate, module.momentum_gate, module.forget_gate)]
        grads = [torch.autograd.grad(y.square().sum(), weights) for y in (whole, torch.cat(outs, 1))]
        for got, want in zip(*grads, strict=True):
            assert want.abs().sum() > 0 and rel(got, want) < 1e-10


def test_a_chunk_split_between_calls_takes_one_mean():
    """The issue's case: chunk 4..7 split after token 5. Its four tokens fold with the same theta, the mean one call
    takes, and the gradient through the streamed pieces equals one call's (per-chunk retrieval, so the outputs are
    the same function of the parameters)."""
    module = build_memory(["update.lr.gate=per_chunk", "memory.retrieval=per_chunk"])
    randomise_gates(module)
    x = x_of(12)
    one = module.gates(x).theta[:, 4:8]
    _, state = module(x[:, :6])
    second = module.gates(x[:, 6:8], state)
    streamed = torch.cat([second.memory.pending.theta, second.theta], 1)
    assert rel(streamed, one) < 1e-14 and rel(one, one[:, :1].expand_as(one)) < 1e-14
    grads = []
    for outs in ([module(x)[0]], stream(module, x, [6, 3, 3])[0]):
        weight = module.lr_gate.proj.weight
        (grad,) = torch.autograd.grad(torch.cat(outs, 1).square().sum(), weight)
        grads.append(grad)
    assert grads[0].abs().sum() > 0 and rel(*grads) < 1e-10


def test_a_state_without_its_per_chunk_gate_values_is_refused():
    module = build_memory(["update.forget.gate=per_chunk"])
    _, state = module(x_of(6))
    with pytest.raises(ValueError, match="pending tokens but not their per-chunk forget gate values"):
        module(x_of(3), dataclasses.replace(state, gates=None))


def test_empty_input_and_an_empty_batch():
    """T = 0 gives an empty output and the state unchanged, fresh or with pending tokens (and per-chunk gate values,
    and convolution history); a batch of 0 rows runs and streams."""
    module = build_memory(["update.lr.gate=per_chunk"])
    y, state = module(x_of(0))
    assert y.shape == (2, 0, 24) and state.memory.pending_len == 0
    _, state = module(x_of(6))
    y, same = module(x_of(0), state)
    assert y.shape == (2, 0, 24) and same is state
    y, state = module(x_of(6, batch=0))
    assert y.shape == (0, 6, 24) and state.memory.pending_len == 2
    assert module(x_of(3, batch=0), state)[0].shape == (0, 3, 24)
    assert module(x_of(0, batch=1), cu_seqlens=[0, 0])[0].shape == (1, 0, 24)


@pytest.mark.parametrize("retrieval", ["after", "per_chunk"])
def test_a_diverging_memory_is_reported_with_its_first_token(retrieval):
    """Float32, 300 tokens: the weights overflow at token ~108. The module raises MemoryDivergedError at the first
    token whose weights W_t are not finite: where the sequential reference's output (which forms and reads every
    W_t) turns non-finite with ``after`` retrieval, and within the chunk before that with per-chunk retrieval
    (which reads W_t only from the next chunk on); switched off, the module returns the non-finite output."""
    module = build_memory([*DIVERGING, f"memory.retrieval={retrieval}", "memory.out_proj=false"], dtype=torch.float32)
    x = x_of(300, dtype=torch.float32)
    with pytest.raises(MemoryDivergedError, match="the memory weights are not finite from token") as caught:
        module(x)
    reference = build_memory(
        [*DIVERGING, f"memory.retrieval={retrieval}", "memory.out_proj=false"], backend="reference"
    )
    reference.load_state_dict(module.state_dict())
    reference = reference.float()
    reference.check_finite, reference.readout_norm = False, None
    y = reference(x)[0].view(2, 300, 2, 6)
    after = module.config.retrieval == "after"
    first = int((~y.isfinite()).flatten(2).any(-1).any(0).nonzero()[0])
    assert caught.value.layer == "NeuralMemory" and 0 < caught.value.token < 300
    assert caught.value.token == first if after else first - module.config.chunk_size <= caught.value.token < first


def test_document_boundaries_reset_the_memory():
    module = build_memory()
    randomise_gates(module)
    x = x_of(23, batch=1)
    packed, _ = module(x, cu_seqlens=[0, 5, 5, 17, 23])
    separate = torch.cat([module(x[:, a:b])[0] for a, b in [(0, 5), (5, 17), (17, 23)]], 1)
    assert rel(packed, separate) < 1e-12
    with pytest.raises(ValueError, match="cu_seqlens"):
        module(x, cu_seqlens=[0, 30])


def test_every_parameter_gets_a_gradient():
    module = build_memory()
    randomise_gates(module)
    y, _ = module(x_of(13))
    y.square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_checkpointing_changes_nothing_but_memory():
    plain, ckpt = build_memory(), build_memory(["memory.checkpoint=true"])
    ckpt.load_state_dict(plain.state_dict())
    x = x_of(18)
    grads = []
    for module in (plain, ckpt):
        module.zero_grad()
        module(x)[0].sum().backward()
        grads.append([p.grad.clone() for p in module.parameters()])
    assert rel(plain(x)[0], ckpt(x)[0]) < 1e-12
    assert all(rel(a, b) < 1e-10 for a, b in zip(*grads, strict=True))


def test_sixteen_thousand_tokens_stay_finite():
    """Default gates, float32, 16K random tokens: no inf or NaN anywhere in the output or the final state."""
    registry = new_registry()
    loaded = load_spec(SPECS / "titans_lmm_small.yaml", registry=registry)
    torch.manual_seed(0)
    module = NeuralMemory.from_block(loaded.spec.blocks[0], loaded.spec.model, registry)
    with torch.no_grad():
        y, state = module(torch.randn(1, 16384, loaded.spec.model.dim))
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(w).all() for w in state.memory.weights + state.memory.momentum)


@pytest.mark.parametrize("bias", [-30.0, 30.0])
def test_extreme_inputs_and_saturated_gates_stay_finite(bias):
    """Inputs of norm ~1e4 and every gate logit at +-30 (alpha, eta, theta at 0 or 1): forward and backward
    stay finite."""
    module = build_memory(dtype=torch.float32)
    with torch.no_grad():
        for gate in (module.lr_gate, module.momentum_gate, module.forget_gate):
            gate.bias.fill_(bias)
    x = (x_of(40, dtype=torch.float32) * 1e4).requires_grad_()
    y, state = module(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    assert all(torch.isfinite(w).all() for w in state.memory.weights)


def test_detached_state_cuts_backpropagation_but_keeps_values():
    """Truncated backpropagation through time: a detached state continues the stream with the same values, and
    the next piece's loss no longer reaches the first piece's input."""
    module = build_memory()
    randomise_gates(module)
    x = x_of(14).requires_grad_()
    _, state = module(x[:, :9])
    attached, _ = module(x[:, 9:], state)
    detached, _ = module(x[:, 9:], state.detach())
    assert torch.equal(attached, detached)
    (grad_attached,) = torch.autograd.grad(attached.sum(), x)
    (grad_detached,) = torch.autograd.grad(detached.sum(), x)
    assert grad_attached[:, :9].abs().sum() > 0 and grad_detached[:, :9].abs().sum() == 0


@pytest.mark.parametrize("kernel", [1, 2, 4, 5])
def test_depthwise_causal_conv_equals_grouped_conv1d(kernel):
    """The shifted multiply-add convolution equals torch's grouped Conv1d over the same (history-first) input,
    forward and gradients, in float64."""
    from titans_compose.nn.memory import _depthwise_causal_conv

    channels, length = 6, 11
    torch.manual_seed(kernel)
    conv = torch.nn.Conv1d(channels, channels, kernel, groups=channels, bias=False).to(F64)
    full = torch.randn(2, kernel - 1 + length, channels, dtype=F64, requires_grad=True)
    ours = _depthwise_causal_conv(full, conv.weight[:, 0, :])
    theirs = conv(full.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ours)
    got = torch.autograd.grad(ours, (full, conv.weight), grad)
    want = torch.autograd.grad(theirs, (full, conv.weight), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
