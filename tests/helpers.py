"""Helpers shared by the test modules: paths, the memory configurations and inputs of the op tests, the small
NeuralMemory of the module tests, a throwaway plug-in, and manifest mutations.

A module of its own, not conftest.py, like grids.py: test modules import it, and scripts that the tests run in fresh
processes import test modules, which must not pick up conftest's environment settings (it switches Triton's
interpreter on). Test modules import helpers from here, never from each other. conftest.py imports it too, so the
builder and the modules are imported only by the helpers that build them.
"""

from __future__ import annotations

import importlib.util
import json
import socket
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
import torch
import torch.nn.functional as F

from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.ops.memory.state import MemoryState
from titans_compose.registry.rules import ACTIVATIONS, LOSSES, OPTIMIZERS, RETENTIONS, HuberParams, LpParams

if TYPE_CHECKING:
    from titans_compose.nn import NeuralMemory

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
GOLDEN = ROOT / "tests" / "golden"


def shipped_specs() -> list[Path]:
    """Every spec file shipped in specs/ (recursively; specs/sweeps/ holds sweep files, not specs)."""
    return sorted(p for p in SPECS.rglob("*.yaml") if p.relative_to(SPECS).parts[0] != "sweeps")


def load_benchmark(script: str, name: str) -> ModuleType:
    """A script of benchmarks/ as a module; its sibling ``record`` is found the way running the script finds it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "benchmarks"))
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    import torch.distributed as dist

    from titans_compose.train.distributed import shutdown

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other ranks may never reach it
        raise
    # a barrier before leaving, as the CLI's training does: without one, a rank that finished first tore the group
    # down while rank 0 still wrote its last checkpoint, and once (a CI run) that rank aborted at exit
    shutdown()


def on_gloo_ranks(fn: Callable[..., None], world: int, *args: Any) -> None:
    """``fn(rank, world, *args)`` in ``world`` fresh processes joined in one gloo process group, one intra-op thread
    each (``fn``: a module-level function, which the processes import; results go through files). An exception in
    a rank fails the call with that rank's traceback."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_rank, args=(world, free_port(), fn, args), nprocs=world, join=True)


#: the shipped specs at a tiny width, keeping their heads (memory 2, attention 4), for the context-parallel tests:
#: chunks of 4 and MAC segments of 8, which the halves of a sequence split
TINY_SHIPPED = [
    "model.dim=32",
    "memory.head_dim=8",
    "memory.expansion=2",
    "memory.chunk_size=4",
    "mac.segment=8",
    "attention.window=8",
]


# ---------------------------------------------------------------- the memory op (tests/ops)

F64 = torch.float64
# lp with p = 1.5 (the MIRAS robust regime); p = 3 makes the inner steps diverge at these learning rates
LOSS_PARAMS = {"l2": None, "l1": None, "lp": LpParams(p=1.5), "huber": HuberParams(delta=0.5)}


def make_cfg(depth=2, d=8, hidden=12, loss="l2", activation="silu", **kw) -> MemoryConfig:
    shapes = [(d, d)] if depth == 1 else [(hidden, d)] + [(hidden, hidden)] * (depth - 2) + [(d, hidden)]
    return MemoryConfig(
        layer_shapes=tuple(shapes),
        activation=ACTIVATIONS[activation][0],
        loss=LOSSES[loss][0],
        loss_params=LOSS_PARAMS[loss],
        retention=RETENTIONS["decay"][0],
        optimizer=OPTIMIZERS["momentum"][0],
        **kw,
    )


def make_inputs(cfg: MemoryConfig, T=21, N=3, dtype=F64, seed=0, requires_grad=False, theta_max=0.3):
    """Unit-norm queries and keys, random values, realistic gates, random initial weights."""
    g = torch.Generator().manual_seed(seed)
    d = cfg.head_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    q, k, v = F.normalize(rand(N, T, d), dim=-1), F.normalize(rand(N, T, d), dim=-1), rand(N, T, d)
    theta = theta_max * torch.rand(N, T, generator=g, dtype=dtype)
    log_eta = F.logsigmoid(rand(N, T) + 2.0) if cfg.momentum else None
    log_keep = F.logsigmoid(rand(N, T) + 3.0) if cfg.forget else None
    weights = [rand(N, o, i) / i**0.5 for o, i in cfg.layer_shapes]
    leaves = [q, k, v, theta, log_eta, log_keep, *weights]
    if requires_grad:
        for t in leaves:
            if t is not None:
                t.requires_grad_()
    return q, k, v, theta, log_eta, log_keep, weights


def run(fn, cfg, q, k, v, theta, log_eta, log_keep, weights):
    return fn(q, k, v, theta, log_eta, log_keep, MemoryState.initial(weights, cfg.momentum), cfg)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# ---------------------------------------------------------------- the NeuralMemory module (tests/nn)

SMALL = [
    *("update.momentum.form=paper", "update.lr.scale=none"),  # the paper's step, whatever the spec ships
    "model.dim=24",
    "memory.heads=2",
    "memory.head_dim=6",
    "memory.expansion=2",
    "memory.chunk_size=4",
    "memory.residual=true",
    "memory.output_norm=true",
]


def build_memory(overrides=(), backend=None, seed=0, spec="titans_lmm_small.yaml", dtype=F64) -> NeuralMemory:
    """The first block's memory of ``spec`` with the :data:`SMALL` settings and ``overrides``, in ``dtype``."""
    from titans_compose.nn import NeuralMemory
    from titans_compose.registry import new_registry
    from titans_compose.spec import load_spec

    registry = new_registry()
    loaded = load_spec(SPECS / spec, [*SMALL, *overrides], registry=registry)
    torch.manual_seed(seed)
    module = NeuralMemory.from_block(loaded.spec.blocks[0], loaded.spec.model, registry, backend=backend)
    return module.to(dtype)


def randomise_gates(module: NeuralMemory, scale=0.3) -> None:
    """Gate projections start at zero (every gate at its initial value); give them data dependence."""
    with torch.no_grad():
        for gate in (module.lr_gate, module.momentum_gate, module.forget_gate):
            if gate is not None and gate.proj is not None:
                gate.proj.weight.normal_(0, scale)


def x_of(length, batch=2, dim=24, seed=1, dtype=F64):
    return torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def stream(module, x, cuts, state=None):
    """The outputs of ``x`` fed in pieces of the lengths ``cuts``, one list entry per piece, and the final state."""
    outs, start = [], 0
    for n in cuts:
        y, state = module(x[:, start : start + n], state)
        outs.append(y)
        start += n
    return outs, state


def assert_same_memory_state(a, b, tol=1e-12):
    """Two NeuralMemoryStates carry the same weights, momentum, pending tokens and per-chunk gate values."""
    for x, y in zip(
        a.memory.weights + (a.memory.momentum or ()), b.memory.weights + (b.memory.momentum or ()), strict=True
    ):
        assert rel(x, y) < tol
    assert a.memory.pending_len == b.memory.pending_len
    if a.memory.pending is not None:
        for x, y in zip(vars(a.memory.pending).values(), vars(b.memory.pending).values(), strict=True):
            assert (x is None) == (y is None) and (x is None or rel(x, y) < tol)
    assert (a.gates is None) == (b.gates is None)
    for name in a.gates or {}:
        assert rel(a.gates[name], b.gates[name]) < tol


#: a rule the spec admits whose recurrence diverges: a matrix memory (no output LayerNorm, which bounds the
#: gradient) with momentum 0.9 and theta 5 on unit keys, in the paper's form
DIVERGING = [
    *("update.momentum.form=paper", "update.lr.scale=none"),
    *("memory.depth=1", "memory.residual=false", "memory.output_norm=false", "update.forget=off"),
    *("update.momentum.init=0.9", "update.lr.max_lr=10", "update.lr.init=5"),
]


# ---------------------------------------------------------------- plug-ins and build manifests

PLUGIN = '''
"""A throwaway plug-in: a Cauchy loss with a scale parameter."""
from pydantic import Field
from titans_compose import RuleParams
from titans_compose.registry.rules import Loss


class CauchyParams(RuleParams):
    scale: float = Field(1.0, gt=0, description="Cauchy scale c")


def register(registry):
    registry.register(
        "loss",
        "cauchy",
        Loss(lambda e, p: (1 + (e / p.scale).square()).log().sum(-1),
             lambda e, p: 2 * e / (p.scale ** 2 + e.square())),
        params=CauchyParams,
        description="log(1 + (e/c)^2): a heavy-tailed robust loss",
    )
'''


#: values of every JSON type, to replace a manifest value with one of another type
WRONG_TYPES = {"null": None, "bool": True, "int": 7, "float": 1.5, "str": "x", "list": [], "dict": {}}
REMOVED = object()


def _json_type(value):
    return next(name for name, wrong in WRONG_TYPES.items() if type(wrong) is type(value) or (wrong is None is value))


def manifest_mutations(manifest, wrong):
    """(path, manifest) for every value in ``manifest``, at every depth, with ``wrong`` put in its place (or the key
    removed, for :data:`REMOVED`), where ``wrong`` is of another JSON type than the value."""

    def paths(node, at=()):
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            yield (*at, key), value
            if isinstance(value, dict | list):
                yield from paths(value, (*at, key))

    for path, value in list(paths(manifest)):
        if wrong is not REMOVED and _json_type(value) == _json_type(wrong):
            continue
        mutated = json.loads(json.dumps(manifest))
        parent = mutated
        for key in path[:-1]:
            parent = parent[key]
        if wrong is REMOVED:
            del parent[path[-1]]
        else:
            parent[path[-1]] = wrong
        yield ".".join(map(str, path)), mutated


def refusals(directory, loader, error, wrong):
    """Load ``directory`` with each mutation of its manifest: every failure must be ``error`` naming a file of the
    directory. Returns the paths whose mutation loaded (they still describe a valid manifest) and the messages."""
    from titans_compose.builder import MANIFEST

    original = (directory / MANIFEST).read_text()
    loaded, messages = [], []
    try:
        for path, mutated in manifest_mutations(json.loads(original), wrong):
            (directory / MANIFEST).write_text(json.dumps(mutated))
            try:
                loader(directory)
            except error as exc:
                assert str(directory) in str(exc), (path, str(exc))
                messages.append(str(exc))
            else:
                loaded.append(path)
    finally:
        (directory / MANIFEST).write_text(original)
    return loaded, messages


# ------------------------------------------------------------------------------------------ tiny models of each kind

VARIANTS = ["mac", "mag", "mal", "lmm", "attention"]
VOCAB = 23

SMALL_MODEL = {
    "name": "tiny",
    "model": {"vocab_size": VOCAB, "dim": 16},
    "memory": {"heads": 2, "head_dim": 8, "depth": 2, "expansion": 2, "chunk_size": 4},
    "projections": {"conv_kernel": 3},
    "persistent": {"tokens": 2},
    "attention": {"heads": 2, "window": 5},
    "mac": {"segment": 8},
    "mlp": {"kind": "swiglu", "expansion": 2},
}


def build_model(tmp_path, kind: str, overrides: list[str] = (), dtype: torch.dtype = torch.float64, seed: int = 0):
    """A 2-layer model of block ``kind`` at the SMALL_MODEL sizes, with --set style ``overrides``."""
    import yaml

    from titans_compose.graph import compile_graph
    from titans_compose.nn.model import TitansLM
    from titans_compose.registry import new_registry
    from titans_compose.spec import load_spec

    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump({**SMALL_MODEL, "blocks": [{"kind": kind, "repeat": 2}]}))
    loaded = load_spec(path, list(overrides), registry=new_registry())
    graph, _ = compile_graph(loaded)
    torch.manual_seed(seed)
    return TitansLM.from_graph(graph, loaded).to(dtype), graph


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
