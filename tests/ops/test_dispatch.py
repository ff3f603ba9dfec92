"""Choosing the memory backend per call: CPU -> chunked (saying what CUDA would run), forced Triton under the
interpreter (generated now vs taken from the cache, the backward path, variable-length batches), clear errors
without the interpreter, the fallback with the generator's reason, and the build report."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import ROOT, SPECS, build_memory, randomise_gates, rel, x_of
from titans_compose.builder import build as build_model
from titans_compose.ops.memory.codegen import cache, emit
from titans_compose.ops.memory.codegen.key import kernel_key
from titans_compose.ops.memory.dispatch import (
    AUTO,
    ENV_VAR,
    INTERPRET_VAR,
    BackendChoice,
    MemoryBackend,
    choose_backend,
    forced_backend,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F32 = torch.float32
#: the build tests' model, shrunk so that the interpreter runs it in seconds
TINY = [
    "model.dim=16",
    "memory.heads=2",
    "memory.head_dim=8",
    "memory.expansion=2",
    "memory.chunk_size=16",
    "blocks=[{kind: lmm, repeat: 2}]",
]


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """A private kernel cache for the test."""
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "kernels"))
    return tmp_path / "kernels"


@pytest.fixture
def interpreter(monkeypatch, kernel_cache):
    monkeypatch.setenv(INTERPRET_VAR, "1")
    return kernel_cache


def on_cuda(dtype=F32):
    """What :meth:`MemoryBackend.resolve` reads from a CUDA tensor (no GPU here: its device and dtype)."""
    return SimpleNamespace(device=SimpleNamespace(type="cuda"), dtype=dtype)


def test_what_was_asked_for(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert choose_backend().name == AUTO and choose_backend("auto").name == AUTO
    assert choose_backend("triton").reason == "requested: triton"
    monkeypatch.setenv(ENV_VAR, "triton")
    assert choose_backend() == BackendChoice("triton", f"forced by {ENV_VAR}=triton")
    with pytest.raises(ValueError, match=r"unknown memory backend 'cuda'; available: chunked, reference, triton, auto"):
        choose_backend("cuda")


def test_cuda_tensors_run_the_generated_kernel_when_supported(kernel_cache):
    module = build_memory(dtype=F32)
    choice = module.dispatch.resolve(on_cuda(), module.config)
    key = kernel_key(module.config, "float32")
    assert choice.name == "triton" and choice.reason.startswith("cuda tensors; kernel ")
    assert f"{cache.source_path(key).name} generated now; backward: " in choice.reason
    assert choice.kernel == cache.source_path(key).absolute()
    assert module.dispatch.resolve(on_cuda(), module.config) is choice  # memoised per device, dtype and key
    assert [e.digest for e in cache.entries()] == [key.digest()]


def test_cuda_tensors_fall_back_with_the_generators_reason(kernel_cache):
    # depth 3 at head dim 64, hidden 256: too large for one program, and only depth 2 is tiled
    deep = build_memory(["memory.depth=3", "model.dim=128", "memory.head_dim=64", "memory.expansion=4"], dtype=F32)
    choice = deep.dispatch.resolve(on_cuda(), deep.config)
    assert choice.name == "chunked" and choice.reason.startswith("cuda tensors, but the generated kernel does not")
    assert "depth 2 only" in choice.reason
    wide = build_memory(dtype=F32)
    choice = wide.dispatch.resolve(on_cuda(torch.float64), wide.config)
    assert choice.name == "chunked" and "inputs of dtype float64" in choice.reason
    assert cache.entries() == []


def test_forcing_triton_on_the_cpu_needs_the_interpreter(monkeypatch, kernel_cache):
    monkeypatch.delenv(INTERPRET_VAR, raising=False)
    monkeypatch.setenv(ENV_VAR, "triton")
    module = build_memory(dtype=F32)
    with pytest.raises(RuntimeError, match=f"{ENV_VAR}=triton on CPU tensors needs Triton's interpreter: set "):
        module(x_of(5, dtype=F32))
    # a configuration the kernel cannot run (float64) falls back without needing the interpreter, and says why
    fallback = build_memory()
    y, _ = fallback(x_of(5))
    assert torch.isfinite(y).all() and fallback.choice.name == "chunked"
    assert fallback.choice.reason.startswith(f"forced by {ENV_VAR}=triton, but the generated kernel does not apply")
    with pytest.raises(RuntimeError, match="got meta tensors"):
        MemoryBackend("triton").resolve(torch.empty(0, device="meta"), module.config)


def test_forcing_triton_on_the_cpu_without_numpy_says_so(monkeypatch, kernel_cache):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numpy" else real(name, *a))
    monkeypatch.setenv(INTERPRET_VAR, "1")
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="Triton's interpreter needs numpy, which is not installed"):
        build_memory(dtype=F32)(x_of(5, dtype=F32))


def test_the_interpreter_runs_the_kernel_with_document_boundaries(interpreter):
    """Forced Triton on the CPU: the same outputs and gradients as the chunked path, for a packed batch of
    documents (cu_seqlens) too; the choice names the kernel, generated now, and the backward path."""
    chunked, triton = build_memory(dtype=F32), build_memory(backend="triton", dtype=F32)
    randomise_gates(chunked)
    triton.load_state_dict(chunked.state_dict())
    x = x_of(21, batch=1, dtype=F32)
    bounds = [0, 5, 5, 18, 21]
    outs = [m(x, cu_seqlens=bounds)[0] for m in (chunked, triton)]
    assert rel(outs[1], outs[0]) < 1e-5
    for out in outs:
        out.square().sum().backward()
    for (name, a), b in zip(chunked.named_parameters(), triton.parameters(), strict=True):
        if a.grad is not None:
            assert rel(b.grad, a.grad) < 1e-4, name
    key = kernel_key(triton.config, "float32")
    assert triton.choice.name == "triton"
    assert triton.choice.reason.startswith(f"requested: triton; kernel {cache.source_path(key).name} generated now")
    assert "; backward: " in triton.choice.reason
    assert "backend=triton" in repr(triton)


@pytest.mark.slow
def test_the_mac_specs_memory_runs_on_its_tiled_clipped_kernel(interpreter):
    """The MAC spec's memory at its shipped size (head dim 64, hidden 256, chunk 16, inner gradient clip 1.0) as a
    whole module, forced onto the kernel in the interpreter: its hidden-tiled, clipped kernel gives the chunked
    path's outputs and parameter gradients."""
    shipped = ["model.dim=128", "memory.heads=2", "memory.head_dim=64", "memory.expansion=4", "memory.chunk_size=16"]
    chunked = build_memory(shipped, spec="titans_mac_small.yaml", dtype=F32)
    triton = build_memory(shipped, backend="triton", spec="titans_mac_small.yaml", dtype=F32)
    key = kernel_key(triton.config, "float32")
    assert (key.hidden_tile, key.grad_clip) == (32, 1.0)
    randomise_gates(chunked)
    triton.load_state_dict(chunked.state_dict())
    x = x_of(37, batch=1, dim=128, dtype=F32)
    outs = [m(x)[0] for m in (chunked, triton)]
    assert triton.choice.name == "triton" and rel(outs[1], outs[0]) < 1e-5
    for out in outs:
        out.square().sum().backward()
    for (name, a), b in zip(chunked.named_parameters(), triton.parameters(), strict=True):
        if a.grad is not None:
            assert rel(b.grad, a.grad) < 1e-4, name


def test_a_kernel_already_on_disk_is_taken_from_the_cache(interpreter):
    module = build_memory(["memory.chunk_size=8"], backend="triton", dtype=F32)
    key = kernel_key(module.config, "float32")
    cache.store(key, emit.generate(key))  # as an earlier run left it
    module(x_of(9, dtype=F32))
    assert f"kernel {cache.source_path(key).name} taken from the cache" in module.choice.reason


def test_the_build_report_says_what_each_memory_layer_ran(interpreter, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "triton")
    report = build_model(SPECS / "titans_lmm_small.yaml", TINY).report
    assert [backend for _, backend, _ in report.backends] == ["triton", "triton"]
    first, second = (reason for _, _, reason in report.backends)
    assert first.startswith(f"forced by {ENV_VAR}=triton; kernel ") and "generated now; backward: " in first
    assert second == first  # one key: both layers run the kernel this process generated
    assert report.kernels == f"kernels: generated Triton kernels for every memory layer (sources in {interpreter})"
    assert f"memory backends:\n  L0.memory: triton (forced by {ENV_VAR}=triton; kernel " in report.summary()


def test_the_build_report_on_the_cpu_without_forcing(kernel_cache, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    report = build_model(SPECS / "titans_lmm_small.yaml", TINY).report
    assert {backend for _, backend, _ in report.backends} == {"chunked"}
    assert all("on CUDA this layer would run the generated kernel" in reason for _, _, reason in report.backends)
    assert report.kernels == "kernels: none generated; the chunked PyTorch path for every memory layer"
    unrun = build_model(SPECS / "titans_lmm_small.yaml", TINY, smoke=False).report
    assert unrun.kernels == "kernels: none generated; chosen at the first forward pass for every memory layer"
    assert cache.entries() == []  # nothing generated for a CPU build


def test_an_interpreter_switched_on_after_importing_triton_is_named(tmp_path):
    script = textwrap.dedent("""
        import os
        import torch
        import triton  # built for the GPU: TRITON_INTERPRET is not set yet
        from tests.helpers import build_memory, x_of

        os.environ["TRITON_INTERPRET"] = "1"
        try:
            build_memory(backend="triton", dtype=torch.float32)(x_of(5, dtype=torch.float32))
        except RuntimeError as exc:
            print(exc)
    """)
    env = {k: v for k, v in os.environ.items() if k != INTERPRET_VAR}
    env.update(PYTHONPATH=str(ROOT), **{cache.ENV_VAR: str(tmp_path)})
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"{INTERPRET_VAR}=1 was set after triton was imported" in out.stdout


@pytest.mark.parametrize("before", [None, "reference"])
def test_forced_backend_sets_the_variable_for_the_block_and_restores_it(monkeypatch, before):
    """Inside the block choose_backend() reads the forced name; afterwards the variable is as it was, unset or set,
    also when the block raises."""
    if before is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, before)
    with forced_backend("chunked"):
        assert choose_backend().name == "chunked"
    assert os.environ.get(ENV_VAR) == before
    with pytest.raises(RuntimeError), forced_backend("triton"):
        raise RuntimeError("inside")
    assert os.environ.get(ENV_VAR) == before
