"""The memory op: one typed value per memory layer, lowered from the spec, the only input its modules are built
from. The model's memory layers against standalone NeuralMemory modules of the same op; a pass editing the op
changes what runs; the deprecated constructor; builds written before the op (old parameter names) still load."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, SPECS, shipped_specs
from titans_compose.builder import load_build
from titans_compose.graph import compile_graph
from titans_compose.graph.blocks import memory_op
from titans_compose.graph.passes import Pass, PassManager
from titans_compose.nn import NeuralMemory
from titans_compose.nn.model import TitansLM
from titans_compose.ops.memory.op import MemoryOp
from titans_compose.registry import new_registry
from titans_compose.spec import load_spec

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
#: every shipped spec at a size that runs in a moment (segment a multiple of the chunk)
TINY = [
    "model.dim=32",
    "memory.heads=2",
    "memory.head_dim=8",
    "memory.expansion=2",
    "memory.chunk_size=4",
    "mac.segment=8",
    "attention.heads=2",
    "attention.window=8",
    "blocks.0.repeat=2",
]
GOLDEN = ROOT / "tests" / "golden"


def tiny_model(path: Path, overrides: list[str] = ()) -> tuple[TitansLM, object, object]:
    registry = new_registry()
    loaded = load_spec(path, [*TINY, *overrides], registry=registry)
    graph, _ = compile_graph(loaded)
    torch.manual_seed(0)
    return TitansLM.from_graph(graph, loaded).to(F64), graph, registry


def randomise_gates(module: NeuralMemory) -> None:
    """Gate projections start at zero; give them data dependence."""
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for gate in (module.lr_gate, module.momentum_gate, module.forget_gate):
            if gate is not None and gate.proj is not None:
                gate.proj.weight.copy_(torch.randn(gate.proj.weight.shape, generator=gen, dtype=F64) * 0.3)


@pytest.mark.parametrize("path", shipped_specs(), ids=lambda p: p.name)
def test_the_models_memory_layers_are_standalone_memories_of_their_ops(path, monkeypatch):
    """Every memory layer of every shipped spec's model, run inside the model (per MAC segment, after MAL's
    persistent tokens), gives the outputs and gradients (inputs and every parameter) of a standalone NeuralMemory
    built from the layer's graph op with the same weights, over the same inputs in one call. float64; tolerance
    1e-10 (the model cuts MAC calls at segment boundaries, which the chunked scan continues exactly, so only the
    order of float additions differs)."""
    model, graph, registry = tiny_model(path)
    layers = model.memory_layers()
    if "swa_baseline" in path.name:
        assert layers == []
        return
    assert [node for node, _ in layers] == [n for n, d in graph.nodes(data=True) if d["op"] == "memory"]
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {node: [] for node, _ in layers}
    for node, layer in layers:
        randomise_gates(layer)
        step = layer.step

        def recorded(x, state=None, spread=None, *, node=node, step=step):
            leaf = x.detach().requires_grad_()
            out, new, call = step(leaf, state, spread)
            calls[node].append((leaf, out))
            return out, new, call

        monkeypatch.setattr(layer, "step", recorded)
    tokens = torch.randint(model.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    model(tokens)
    for node, layer in layers:
        op = graph.nodes[node]["params"]["memory"]
        assert layer.op == op and layer.config == op.config(registry)
        alone = NeuralMemory(op, registry).to(F64)
        alone.load_state_dict(layer.state_dict())
        xs, outs = zip(*calls[node], strict=True)
        if "mac" in path.name:
            assert len(xs) == 3  # 21 tokens: segments of 8, 8 and 5
        x = torch.cat([t.detach() for t in xs], 1).requires_grad_()
        out, _ = alone(x)
        assert (out - torch.cat(outs, 1)).abs().max() < 1e-10
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
        grads = torch.autograd.grad((torch.cat(outs, 1) * weight).sum(), [*xs, *layer.parameters()], allow_unused=True)
        want = torch.autograd.grad((out * weight).sum(), [x, *alone.parameters()], allow_unused=True)
        assert (torch.cat(grads[: len(xs)], 1) - want[0]).abs().max() < 1e-10
        names = [n for n, _ in layer.named_parameters()]
        assert names == [n for n, _ in alone.named_parameters()]
        for name, got, expected in zip(names, grads[len(xs) :], want[1:], strict=True):
            assert (got is None) == (expected is None), name
            if got is not None:
                assert (got - expected).abs().max() < 1e-10, name


def chunk_pass(size: int) -> Pass:
    """A pass that gives every memory node's op ``chunk_size`` = ``size``."""

    def rechunk(graph, registry):
        for _, data in graph.nodes(data=True):
            if data["op"] == "memory":
                data["params"]["memory"] = dataclasses.replace(data["params"]["memory"], chunk_size=size)
        return []

    return Pass("rechunk", rechunk)


def test_a_pass_that_edits_the_chunk_size_changes_the_compiled_layers():
    """The model is built from the graph's ops, not the spec: after a pass sets chunk_size 8 on a chunk-4 spec's
    memory nodes, the layers scan in chunks of 8 and compute exactly what the spec with chunk_size 8 computes (same
    weights), which differs from chunks of 4 (inside a chunk gradients are taken at the chunk-start weights)."""
    spec = SPECS / "titans_lmm_small.yaml"
    base, graph, registry = tiny_model(spec)
    PassManager([chunk_pass(8)]).run(graph, registry)
    loaded = load_spec(spec, TINY, registry=registry)
    edited = TitansLM.from_graph(graph, loaded).to(F64)
    assert [m.config.chunk_size for _, m in edited.memory_layers()] == [8, 8]
    assert [m.config.chunk_size for _, m in base.memory_layers()] == [4, 4]
    reference, _, _ = tiny_model(spec, ["memory.chunk_size=8"])
    edited.load_state_dict(base.state_dict())
    reference.load_state_dict(base.state_dict())
    tokens = torch.randint(base.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
    got, want, four = (m(tokens).logits for m in (edited, reference, base))
    assert (got - want).abs().max() < 1e-12
    assert (got - four).abs().max() > 1e-4


def test_from_block_and_the_deprecated_section_constructor_build_the_same_op():
    """``NeuralMemory.from_block`` builds from the op lowering makes; the old constructor from spec sections still
    works, with a DeprecationWarning, through the same op."""
    registry = new_registry()
    loaded = load_spec(SPECS / "titans_mag_small.yaml", TINY, registry=registry)
    block, model = loaded.spec.blocks[0], loaded.spec.model
    op = memory_op(block, model, registry)
    assert isinstance(op, MemoryOp) and op.chunk_size == 4 and op.eps == block.norm.eps
    assert NeuralMemory.from_block(block, model, registry).op == op
    with pytest.warns(DeprecationWarning, match="NeuralMemory\\(op, registry\\)"):
        old = NeuralMemory(model.dim, block.memory, block.update, block.projections, registry, eps=block.norm.eps)
    assert old.op == op
    with pytest.raises(TypeError, match="the op carries eps"):
        NeuralMemory(op, registry, eps=1e-5)


def test_a_build_written_before_the_memory_op_loads_and_computes_what_it_did():
    """tests/golden/build_v0 was written by titans_compose at 9c0d965 (a memory layer was then a set of nodes with
    other parameter names): it loads, and its model gives the logits that version recorded, in float64 to 1e-12."""
    result = load_build(GOLDEN / "build_v0")
    recorded = json.loads((GOLDEN / "build_v0_logits.json").read_text())
    model = result.module.to(F64)
    logits = model(torch.tensor(recorded["tokens"])).logits
    assert (logits - torch.tensor(recorded["logits"], dtype=F64)).abs().max() < 1e-12
    assert [node for node, _ in model.memory_layers()] == ["L0.memory", "L1.memory", "L2.memory", "L3.memory"]
    assert "nodes.L0__memory__read_ctx.q_proj.weight" in model.state_dict()


def test_a_training_checkpoint_of_the_old_layout_is_refused_not_misread(tmp_path):
    """An optimizer's state is ordered by the parameters, whose order the old module tree set: resuming a
    checkpoint of that layout is refused with a clear error instead of pairing moments with other parameters."""
    from torch import nn

    from titans_compose.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    old = nn.Module()
    old.nodes = nn.ModuleDict({"L0__proj_k": nn.Module()})
    old.nodes["L0__proj_k"].linear = nn.Linear(2, 2, bias=False)
    save_checkpoint(tmp_path, step=1, model=old, optimizer=torch.optim.AdamW(old.parameters()), state={})
    model, _, _ = tiny_model(SPECS / "titans_lmm_small.yaml")
    with pytest.raises(CheckpointError, match="before each memory layer became one module"):
        load_checkpoint(tmp_path, model=model, optimizer=torch.optim.AdamW(model.parameters()))
