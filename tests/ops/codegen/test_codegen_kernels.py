"""The generated Triton kernels against the chunked PyTorch path: on CUDA when there is a GPU, else on the CPU in
Triton's interpreter (TRITON_INTERPRET=1).

Every case runs the generated forward and backward in float32 and the chunked path in float64 on the same inputs
(float64 leaves; the kernel path casts them), with NaN-poisoned kernel outputs, odd lengths (T = 21 or 19: never a
multiple of the chunk) and chunk sizes / widths that need padding (chunk 5 -> block 16, hidden 24 -> 32, head dim
20 -> 32). Tolerance, for the outputs, the final state and every gradient (max |error| / max |reference|): below
TOL = 1e-4, or below ERROR_RATIO = 4 times the error of the chunked path itself run in float32 on the same inputs.
The second bound is for ill-conditioned gradients: with the lp loss (p = 1.5, whose second derivative is
|e|^-0.5) behind a LayerNorm the float32 chunked path is off by 3.1e-4 in d/dv, the kernel by 1.3e-4 (the worst
kernel error measured on this grid; every other case is below 3.3e-5). The same class can have a well-conditioned
float32 chunked path and a kernel whose other summation order lands just above both bounds (tiled, momentum, lp
behind a LayerNorm: kernel 1.25e-4, chunked 3.0e-5 in d/dk with numpy 2.4.6 in the interpreter), so lp behind a
LayerNorm has TOL_LP_NORM = 2e-4 instead of TOL. A wrong term (a missing second-order or gate gradient) is off by
1e-2 or more.

The hidden-tiled kernels (depth 2, hidden width streamed in tiles) run the same checks at a tile of 16 columns and
hidden width 40 (two full tiles and a partial one), the tile forced by the ``tiled`` fixture (at interpreter-sized
widths whole matrices would fit).

The golden sources are ``tests/golden/kernel_d2_silu_l2.txt`` and ``kernel_d2_tiled_silu_l2.txt``; after an
intended generator change, regenerate them with
``REGENERATE_GOLDEN=1 pytest tests/ops/codegen/test_codegen_kernels.py -k golden`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.grids import fast_subset
from tests.helpers import GOLDEN as GOLDEN_DIR
from tests.helpers import ROOT, make_cfg, make_inputs, rel
from titans_compose.ops.memory.chunked import chunked_memory
from titans_compose.ops.memory.codegen import cache, emit, runtime, tiling
from titans_compose.ops.memory.codegen.key import kernel_key
from titans_compose.ops.memory.codegen.support import unsupported_reason
from titans_compose.ops.memory.state import MemoryState
from titans_compose.registry.rules import Activation

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = GOLDEN_DIR / "kernel_d2_silu_l2.txt"
GOLDEN_TILED = GOLDEN_DIR / "kernel_d2_tiled_silu_l2.txt"
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")  # CPU: the kernels run in Triton's interpreter
TOL = 1e-4
TOL_LP_NORM = 2e-4  # the lp loss behind the output LayerNorm: see the module docstring
ERROR_RATIO = 4.0
LOSSES = ["l2", "l1", "lp", "huber"]
ACTIVATIONS = ["silu", "gelu", "relu", "identity"]
NORMS = [(False, False), (True, True), (True, False), (False, True)]  # (residual, output LayerNorm)


@pytest.fixture(scope="module", autouse=True)
def interpreter(tmp_path_factory):
    """Kernels run on the CPU through Triton's interpreter (read when a generated module's decorators run), from a
    private source cache."""
    saved = {name: os.environ.get(name) for name in ("TRITON_INTERPRET", cache.ENV_VAR)}
    if DEVICE.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ[cache.ENV_VAR] = str(tmp_path_factory.mktemp("kernels"))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every kernel output starts as NaN, so an element the kernels fail to write shows."""

    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(runtime, "_alloc", alloc)


def force_tiles(monkeypatch) -> None:
    """Depth-2 memories get the hidden-tiled kernels, at a tile of 16 columns."""
    monkeypatch.setattr(tiling, "hidden_tile", lambda shapes, chunk: 16 if len(shapes) == 2 else 0)


@pytest.fixture
def tiled(monkeypatch):
    force_tiles(monkeypatch)


def config(depth=2, d=16, hidden=24, loss="l2", activation="silu", **kw):
    cfg = make_cfg(depth=depth, d=d, hidden=hidden, loss=loss, activation=activation, **kw)
    return dataclasses.replace(cfg, names=(activation, loss))


def f32(t):
    """A float64 leaf as the kernel path's float32 input on DEVICE (differentiable)."""
    return None if t is None else t.float().to(DEVICE)


def objective(y, state, seed=7):
    """A random linear function of the outputs and the final state (float64, whatever their dtype)."""
    g = torch.Generator().manual_seed(seed)
    total = (y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device)).sum()
    for w in (*state.weights, *(state.momentum or ())):
        total = total + (w.double() * torch.randn(w.shape, generator=g, dtype=torch.float64).to(w.device)).sum()
    return total


def run(fn, cfg, inputs, pieces):
    """Outputs, final state and gradients (float64 leaves) of ``fn`` on ``inputs`` cast to float32, the sequence
    in calls of the given lengths carrying the state (pending chunk included)."""
    *series, weights = inputs
    state = MemoryState.initial([f32(w) for w in weights], cfg.momentum)
    ys, start = [], 0
    for n in pieces:
        y, state = fn(*(None if t is None else f32(t[:, start : start + n]) for t in series), state, cfg)
        ys.append(y)
        start += n
    y = torch.cat(ys, 1)
    leaves = [t for t in (*series, *weights) if t is not None]
    return y, state, torch.autograd.grad(objective(y, state), leaves)


def errors(cfg, got, want) -> dict[str, float]:
    """Max relative error of each output, final state tensor and gradient of ``got`` against ``want``."""
    (y, state, grads), (y_ref, s_ref, g_ref) = got, want
    out = {"y": rel(y.double().cpu(), y_ref.double().cpu())}
    states = zip((*state.weights, *(state.momentum or ())), (*s_ref.weights, *(s_ref.momentum or ())), strict=True)
    for i, (a, b) in enumerate(states):
        out[f"state{i}"] = rel(a.double().cpu(), b.double().cpu())
    names = ["q", "k", "v", "theta"] + ["log_eta"] * cfg.momentum + ["log_keep"] * cfg.forget
    names += [f"W{i}" for i in range(cfg.depth)]
    for name, a, b in zip(names, grads, g_ref, strict=True):
        assert torch.isfinite(a).all(), name
        out[f"grad {name}"] = rel(a, b)
    return out


def check(cfg, T=21, pieces=None, seed=0, zero_keys=()) -> None:
    """The kernel path (in ``pieces``) against the float64 chunked path, within TOL or ERROR_RATIO times the float32
    chunked path's own error; the tokens ``zero_keys`` have zero keys."""
    inputs = make_inputs(cfg, T=T, N=2, seed=seed, requires_grad=True, theta_max=0.1)
    with torch.no_grad():
        inputs[1][:, list(zero_keys)] = 0.0
    *series, weights = inputs
    y_ref, s_ref = chunked_memory(*series, MemoryState.initial(weights, cfg.momentum), cfg)
    leaves = [t for t in (*series, *weights) if t is not None]
    want = (y_ref, s_ref, torch.autograd.grad(objective(y_ref, s_ref), leaves))
    got = run(runtime.triton_memory, cfg, inputs, pieces or [T])
    assert got[1].pending_len == s_ref.pending_len == T % cfg.chunk_size
    kernel = errors(cfg, got, want)
    chunked32 = errors(cfg, run(chunked_memory, cfg, inputs, [T]), want)
    tol = TOL_LP_NORM if cfg.names[1] == "lp" and cfg.output_norm else TOL
    bad = {
        name: (err, chunked32[name])
        for name, err in kernel.items()
        if not err < max(tol, ERROR_RATIO * chunked32[name])
    }
    assert not bad, f"(kernel error, float32 chunked error): {bad}"


def cycled(n: int, **fixed) -> dict:
    """Case ``n`` of a grid: ``fixed``, and the loss, activation, residual / LayerNorm and chunk size cycling with n."""
    return dict(
        **fixed,
        loss=LOSSES[n % 4],
        activation=ACTIVATIONS[(n // 4 + n) % 4],
        residual=NORMS[(n // 2) % 4][0],
        output_norm=NORMS[(n // 2) % 4][1],
        chunk_size=(8, 5, 16)[n % 3],
    )


# depth x (momentum, forget) x retrieval; the other options cycle so that each appears with every depth and retrieval
# mode.
GRID = [
    cycled(n, depth=depth, momentum=mom, forget=fgt, retrieval=retrieval)
    for n, (depth, (mom, fgt), retrieval) in enumerate(
        (depth, gates, retrieval)
        for depth in (1, 2, 3)
        for gates in ((True, True), (False, False), (True, False), (False, True))
        for retrieval in ("after", "before", "per_chunk")
    )
]


@pytest.mark.parametrize("case", fast_subset(GRID), ids=lambda c: "-".join(str(v) for v in c.values()))
def test_kernel_matches_chunked(case):
    check(config(**case), seed=sum(map(ord, str(case))) % 97)


@pytest.mark.parametrize(
    "case,pieces",
    [
        (dict(depth=2, retrieval="after"), [3, 10, 1, 5]),  # the default Titans memory, a pending chunk resumed
        (dict(depth=1, retrieval="before", chunk_size=5, output_norm=True, d=20), [7, 7, 5]),  # padded head dim
        pytest.param(
            dict(depth=3, retrieval="per_chunk", activation="gelu", loss="huber"), [16, 3], marks=pytest.mark.slow
        ),
    ],
)
def test_pieces_chain_state_and_gradients(case, pieces):
    """The sequence in uneven calls carrying the state (and the unfinished chunk) equals one chunked call,
    gradients through the carried state included."""
    check(config(**case), T=sum(pieces), pieces=pieces)


def golden(key, path: Path) -> None:
    source = emit.generate(key)
    assert source == emit.generate(key)  # deterministic
    assert f"# key: {key.canonical()}\n" in source
    text = source.replace(key.canonical(), "<canonical key>")
    if os.environ.get("REGENERATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), "generated source changed: see the module docstring to regenerate"


def test_generated_source_golden():
    golden(kernel_key(config(depth=2, hidden=32, momentum=True, forget=True), "float32"), GOLDEN)


def test_tiled_source_golden(tiled):
    key = kernel_key(config(depth=2, hidden=40, momentum=True, forget=True), "float32")
    assert key.hidden_tile == 16
    golden(key, GOLDEN_TILED)


# (momentum, forget) x retrieval on the tiled kernels, the other options cycling as in GRID
TILED_GRID = [
    cycled(n, momentum=mom, forget=fgt, retrieval=retrieval)
    for n, ((mom, fgt), retrieval) in enumerate(
        (gates, retrieval)
        for gates in ((True, True), (False, False), (True, False), (False, True))
        for retrieval in ("after", "before", "per_chunk")
    )
]


@pytest.mark.parametrize("case", fast_subset(TILED_GRID), ids=lambda c: "-".join(str(v) for v in c.values()))
def test_tiled_kernel_matches_chunked(tiled, case):
    cfg = config(depth=2, hidden=40, **case)
    assert kernel_key(cfg, "float32").hidden_tile == 16
    check(cfg, seed=sum(map(ord, str(case))) % 89)


# the per-token inner gradient clip: max norm 0.5 acts on every token, 6.0 on some (the tokens' gradient norms at
# the start are 3-11); depth x gates x retrieval, on whole matrices and on hidden tiles
CLIP_GRID = [
    dict(depth=depth, momentum=mom, forget=fgt, retrieval=retrieval, grad_clip=clip, tiled=tiled, **extra)
    for depth, mom, fgt, retrieval, clip, tiled, extra in (
        (1, True, True, "after", 0.5, False, {}),
        (1, False, True, "before", 6.0, False, dict(loss="huber", output_norm=True)),
        (2, True, True, "after", 6.0, False, {}),
        (2, True, False, "per_chunk", 0.5, False, dict(activation="gelu", residual=True)),
        (2, False, False, "before", 0.5, False, dict(loss="lp", output_norm=True, residual=True)),
        (3, True, True, "before", 6.0, False, dict(chunk_size=5)),
        (3, False, True, "after", 0.5, False, dict(activation="relu")),
        (2, True, True, "after", 6.0, True, {}),
        (2, True, True, "after", 0.5, True, dict(output_norm=True, residual=True, chunk_size=5)),
        (2, False, True, "before", 0.5, True, dict(activation="gelu", loss="huber")),
        (2, True, False, "per_chunk", 6.0, True, dict(loss="lp", output_norm=True)),
        (2, False, False, "after", 0.5, True, dict(activation="identity", residual=True)),
    )
]


@pytest.mark.parametrize("case", fast_subset(CLIP_GRID), ids=lambda c: "-".join(str(v) for v in c.values()))
def test_clipped_kernel_matches_chunked(case, monkeypatch):
    case = dict(case)
    if case.pop("tiled"):
        force_tiles(monkeypatch)
        case["hidden"] = 40
    cfg = config(**case)
    assert kernel_key(cfg, "float32").grad_clip == case["grad_clip"]
    check(cfg, seed=sum(map(ord, str(case))) % 83)


@pytest.mark.parametrize("tiled", [False, True])
def test_clipped_kernel_with_a_zero_inner_gradient(tiled, monkeypatch):
    """Tokens with zero keys have a zero inner gradient, ||g_t|| = 0 in the clip factor: the kernels' clip keeps
    ||g_t||^2 at least the smallest normal float32 and takes the factor's derivative only where the clip acts, so
    their gradients stay finite (``errors`` asserts it) and match the chunked path."""
    if tiled:
        force_tiles(monkeypatch)
    cfg = config(depth=2, hidden=40 if tiled else 24, grad_clip=0.5, chunk_size=5)
    check(cfg, T=12, seed=3, zero_keys=(0, 6, 11))


@pytest.mark.slow
@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_shipped_memory_runs_on_its_own_tiles(grad_clip):
    """The shipped specs' memory (head dim 64, hidden 256, chunk 16, SiLU, l2, momentum and forget) at the tile
    tiling.py chooses for it, with and without the MAC spec's clip."""
    cfg = config(d=64, hidden=256, chunk_size=16, grad_clip=grad_clip)
    assert kernel_key(cfg, "float32").hidden_tile == 32
    check(cfg, T=19)


@pytest.mark.slow
def test_kernels_compile_for_an_h100(tmp_path):
    """The interpreter runs the generated Python, not Triton's compiler: compile one kernel pair (hidden tiles, the
    clip, LayerNorm and residual, momentum and forget: most of the generator's branches) to an sm_90 cubin with
    Triton's bundled ptxas, which needs no GPU, and check that it fits an H100 block's shared memory. In a fresh
    process (Triton's compiler cannot load where triton was imported for the interpreter) with an empty Triton cache
    (a cached cubin would skip the compile)."""
    script = """
import json, pytest
from tests.ops.codegen.test_codegen_kernels import config, force_tiles
from titans_compose.ops.memory.codegen import cache, emit, tiling
from titans_compose.ops.memory.codegen.key import kernel_key
force_tiles(pytest.MonkeyPatch())
key = kernel_key(config(depth=2, hidden=40, grad_clip=1.0, output_norm=True, residual=True), "float32")
assert key.hidden_tile == 16
module = cache.load(key, emit.generate).module
try:
    shared = [tiling.compile_for_sm90(getattr(module, name), key.dtype).metadata.shared
              for name in ("forward_kernel", "backward_kernel")]
except (ImportError, FileNotFoundError) as missing:  # a triton build without the CUDA backend's tools
    shared = str(missing)
print(json.dumps(shared))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({cache.ENV_VAR: str(tmp_path / "kernels"), "TRITON_CACHE_DIR": str(tmp_path / "triton")})
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = json.loads(done.stdout.strip().splitlines()[-1])
    if isinstance(shared, str):
        pytest.skip(f"cannot compile for sm_90 here: {shared}")
    assert all(0 < size <= tiling.H100_SHARED_PER_BLOCK for size in shared), shared


@pytest.mark.slow
def test_tiled_pieces_chain_state_and_gradients(tiled):
    """The default Titans memory on the tiled kernels, in uneven calls carrying the state."""
    check(config(depth=2, hidden=40, retrieval="after", chunk_size=4), T=19, pieces=[3, 10, 1, 5])


def test_keys_give_distinct_kernels_and_the_cache_hits():
    a = kernel_key(config(depth=2), "float32")
    b = kernel_key(config(depth=2, loss="huber"), "float32")
    assert a.digest() != b.digest() and emit.generate(a) != emit.generate(b)
    first = cache.load(a, emit.generate)
    assert first.path.read_text() == emit.generate(a)
    assert cache.load(a, emit.generate).module is first.module
    assert cache.load(b, emit.generate).path != first.path


def test_support():
    assert unsupported_reason(config(), torch.float32) is None
    assert unsupported_reason(config(grad_clip=1.0), torch.float32) is None
    assert "float64" in unsupported_reason(config(), torch.float64)
    cfg = config()
    bare = dataclasses.replace(cfg, activation=Activation(cfg.activation.fn, cfg.activation.grad))
    assert "Triton expressions" in unsupported_reason(bare, "float32")
    # too large for whole matrices: depth 2 is tiled, other depths are not
    assert "depth 2 only" in unsupported_reason(config(depth=3, hidden=300), "float32")
    assert "depth 2 only" in unsupported_reason(config(depth=1, d=128, chunk_size=32), "float32")
    assert unsupported_reason(config(depth=1, d=128, chunk_size=16), "float32") is None
    assert unsupported_reason(config(d=64, hidden=128, chunk_size=16), "float32") is None
    assert kernel_key(config(d=64, hidden=64, chunk_size=16), "float32").hidden_tile == 0  # whole matrices
    assert kernel_key(config(d=64, hidden=128, chunk_size=16), "float32").hidden_tile == 32  # tiles compile faster
    for chunk in (16, 32):  # the shipped memory (head dim 64, hidden 256) runs on hidden tiles
        shipped = config(d=64, hidden=256, chunk_size=chunk)
        assert unsupported_reason(shipped, "float32") is None
        assert kernel_key(shipped, "float32").hidden_tile == 32
    assert "no hidden tile fits" in unsupported_reason(config(d=64, hidden=256, chunk_size=64), "float32")
    large = config(depth=3, hidden=300)
    *inputs, weights = make_inputs(large, T=4, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="depth 2 only"):
        runtime.triton_memory(*inputs, MemoryState.initial(weights, True), large)


def test_zero_length_call_keeps_the_state():
    cfg = config(depth=1)
    q, k, v, theta, log_eta, log_keep, weights = make_inputs(cfg, T=0, N=2, dtype=torch.float32)
    state = MemoryState.initial(weights, True)
    y, out = runtime.triton_memory(q, k, v, theta, log_eta, log_keep, state, cfg)
    assert y.shape == (2, 0, 16) and out.weights[0] is weights[0] and out.pending is None


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="the interpreter's bfloat16 is wrong")),
    ],
)
def test_16_bit_inputs(dtype):
    """16-bit q, k, v and gates (float32 state and math): outputs and gradients in the inputs' dtypes, against the
    float64 chunked path on the same rounded inputs. The errors are the rounding of the inputs and outputs: float16
    measured 6.2e-4 in the interpreter and, on an H200 (three tf32 products), outputs 1.6e-4 and gradients 5-7e-4
    (tolerance 2e-3); bfloat16 keeps 8 bits: outputs 2.1e-3 and gradients 0.8-1.0e-2 on the H200 (tolerance 2e-2).
    With one tf32 product the H200 gave 2.8e-2 (float16) and 3.2e-2 (bfloat16) on the outputs and failed."""
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    cfg = config(depth=2, chunk_size=8)
    *series, weights = make_inputs(cfg, T=19, N=2)
    low = [None if t is None else t.to(DEVICE, dtype).requires_grad_() for t in series]
    exact = [None if t is None else t.detach().double().cpu().requires_grad_() for t in low]
    w32 = [w.float().to(DEVICE).requires_grad_() for w in weights]
    w64 = [w.detach().double().cpu().requires_grad_() for w in w32]
    y, state = runtime.triton_memory(*low, MemoryState.initial(w32, True), cfg)
    y_ref, s_ref = chunked_memory(*exact, MemoryState.initial(w64, True), cfg)
    assert y.dtype == dtype and state.weights[0].dtype == torch.float32
    assert rel(y.double().cpu(), y_ref) < tol
    for a, b in zip(state.weights, s_ref.weights, strict=True):
        assert rel(a.double().cpu(), b) < tol
    grads = torch.autograd.grad(objective(y, state), [*low, *w32])
    grads_ref = torch.autograd.grad(objective(y_ref, s_ref), [*exact, *w64])
    for got, want, leaf in zip(grads, grads_ref, [*low, *w32], strict=True):
        assert got.dtype == leaf.dtype and torch.isfinite(got).all()
        assert rel(got.double().cpu(), want) < tol


def test_ops_have_consistent_fake_implementations():
    """The torch.library ops' fake (meta) implementations, which torch.compile traces, agree with the real ones."""
    cfg = config(depth=2, chunk_size=8)
    key = kernel_key(cfg, "float32")
    runtime.kernels(key)
    *series, weights = make_inputs(cfg, T=19, N=2, dtype=torch.float32)
    q, k, v, theta, log_eta, log_keep = (t.to(DEVICE) for t in series)
    weights = tuple(w.to(DEVICE) for w in weights)
    state0 = runtime._pack(weights, tuple(torch.zeros_like(w) for w in weights))
    args = (key.digest(), q, k, v, theta, log_eta, log_keep, state0)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.titans_compose.memory_forward.default, args, test_utils=utils)
    _, states = torch.ops.titans_compose.memory_forward(*args)
    gy, gfinal = torch.randn_like(q), torch.randn_like(state0)
    backward_args = (key.digest(), gy, gfinal, q, k, v, theta, log_eta, log_keep, states)
    torch.library.opcheck(torch.ops.titans_compose.memory_backward.default, backward_args, test_utils=utils)


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="a CPU machine's set-up: on a GPU the kernels run compiled")
def test_interpreter_switched_on_after_importing_triton(tmp_path):
    """The generated code calls no triton.language.standard @jit function (decorated for the GPU when triton is
    imported without TRITON_INTERPRET), so it runs under an interpreter switched on after triton's import."""
    script = f"""
import os, dataclasses
import triton  # built for the GPU: TRITON_INTERPRET is not set yet
import torch
from tests.helpers import make_cfg, make_inputs
from titans_compose.ops.memory.codegen import runtime
from titans_compose.ops.memory.chunked import chunked_memory
from titans_compose.ops.memory.state import MemoryState
os.environ["TRITON_INTERPRET"] = "1"
os.environ["{cache.ENV_VAR}"] = {str(tmp_path)!r}
cfg = make_cfg(depth=2, d=16, hidden=24, chunk_size=8, output_norm=True, activation="gelu", loss="lp")
cfg = dataclasses.replace(cfg, names=("gelu", "lp"))
*series, weights = make_inputs(cfg, T=11, N=1, dtype=torch.float32)
y, _ = runtime.triton_memory(*series, MemoryState.initial(weights, True), cfg)
y_ref, _ = chunked_memory(*series, MemoryState.initial(weights, True), cfg)
assert (y - y_ref).abs().max() < 1e-4, (y - y_ref).abs().max()
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
