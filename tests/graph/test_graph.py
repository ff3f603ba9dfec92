"""The graph IR: lowering of each variant, the passes (on shipped specs and on broken hand-made graphs), the pass
manager, and rendering."""

from __future__ import annotations

import networkx as nx
import pytest

from tests.helpers import SPECS
from titans_compose.errors import Location
from titans_compose.graph import compile_graph, lower
from titans_compose.graph.ir import (
    OPS,
    SHAPE_RULES,
    GraphBuilder,
    ShapeError,
    SymDim,
    dag_view,
    inputs_of,
    origin,
    seq_offset,
)
from titans_compose.graph.passes import DEFAULT_PASSES, Pass, PassManager, check_wiring
from titans_compose.graph.render import to_dot, to_mermaid
from titans_compose.registry import new_registry
from titans_compose.spec import load_spec

VARIANT_SPECS = ["titans_mac_small", "titans_mag_small", "titans_mal_small", "titans_lmm_small", "swa_baseline_small"]


def compiled(name, overrides=()):
    registry = new_registry()
    loaded = load_spec(SPECS / f"{name}.yaml", overrides, registry=registry)
    graph, _ = compile_graph(loaded)
    return graph, registry


def node_of(graph, layer, suffix):
    return f"L{layer}.{suffix}"


def test_every_op_has_a_shape_rule():
    assert set(SHAPE_RULES) == set(OPS)


@pytest.mark.parametrize("name", VARIANT_SPECS)
def test_a_context_read_gets_its_memory_state_by_a_recurrent_edge(name):
    """One memory node per memory layer; MAC's context read (only MAC has one) reads that memory's state through a
    recurrent edge, which every DAG check ignores."""
    graph, _ = compiled(name)
    recurrent = [(u, v) for u, v, d in graph.edges(data=True) if d["recurrent"]]
    memories = [n for n, d in graph.nodes(data=True) if d["op"] == "memory"]
    reads = [n for n, d in graph.nodes(data=True) if d["op"] == "memory_read"]
    assert len(memories) == (0 if name == "swa_baseline_small" else 2)
    assert sorted(recurrent) == (sorted(zip(memories, reads, strict=True)) if name == "titans_mac_small" else [])
    assert all(graph.edges[edge]["port"] == "state" for edge in recurrent)
    assert nx.is_directed_acyclic_graph(dag_view(graph))
    if recurrent:
        assert not nx.is_directed_acyclic_graph(graph)  # the recurrence is real, only marked


def test_mac_wiring_follows_the_paper():
    graph, _ = compiled("titans_mac_small")
    layer = graph.graph["layers"][0]
    attn = node_of(graph, 0, "attention")
    memory = node_of(graph, 0, "memory")
    assert origin(graph, memory, "x") == attn  # keys, values and the output's queries
    ctx_read = origin(graph, attn, "memory")
    assert ctx_read == node_of(graph, 0, "memory.read_ctx")
    assert "state" not in inputs_of(graph, ctx_read)  # the pre-segment state comes by the recurrent edge
    assert graph.edges[memory, ctx_read] == {"port": "state", "recurrent": True}
    assert origin(graph, ctx_read, "queries") == layer["input"]
    assert origin(graph, node_of(graph, 0, "mac_gate"), "gate") == memory  # the updated memory
    assert inputs_of(graph, attn)["persistent"] == node_of(graph, 0, "persistent")
    assert origin(graph, attn, "x") == layer["input"]
    assert graph.nodes[attn]["params"]["order"] == ["persistent", "memory", "segment"]


def test_mag_and_lmm_memory_reads_the_block_input():
    for name in ("titans_mag_small", "titans_lmm_small"):
        graph, _ = compiled(name)
        block_input = graph.graph["layers"][1]["input"]
        assert block_input == graph.graph["layers"][0]["output"]
        assert origin(graph, node_of(graph, 1, "memory"), "x") == block_input


def test_mal_shapes_carry_the_persistent_prefix():
    graph, _ = compiled("titans_mal_small")
    B, T = SymDim("B"), SymDim("T")
    assert graph.nodes["L0.prepend_persistent"]["shape"] == (B, T + 4, 128)
    assert graph.nodes["L0.attention"]["shape"] == (B, SymDim("T", 4), 128)
    assert graph.nodes["L0.drop_persistent"]["shape"] == (B, T, 128)
    assert all(isinstance(d, SymDim) for d in graph.nodes["L0.attention"]["shape"][:2])
    assert origin(graph, "L0.attention", "x") == "L0.memory"


def test_the_memory_op_follows_depth_and_momentum():
    graph, _ = compiled("titans_mac_small", ["memory.depth=3", "update.momentum=off"])
    op = graph.nodes["L0.memory"]["params"]["memory"]
    assert op.layer_shapes == ((256, 64), (256, 256), (64, 256))
    assert (op.heads, op.momentum.enabled, op.forget.enabled) == (2, False, True)
    assert graph.nodes["L0.memory"]["shape"] == (SymDim("B"), SymDim("T"), 128)
    assert "state per batch x 2 heads: W1 256x64, W2 256x256, W3 64x256" in to_mermaid(graph)
    assert "memory" not in graph.nodes["L0.memory.read_ctx"]["params"]  # built from the memory's op


def test_nodes_carry_their_spec_location():
    graph, _ = compiled("titans_mac_small")
    write = graph.nodes["L1.memory"]
    assert write["spec_path"] == "blocks.0.memory"
    assert write["loc"].file.endswith("titans_mac_small.yaml") and write["loc"].line == 11  # `memory:`
    assert graph.nodes["L0.attention"]["spec_path"] == "blocks.0.mac"


def test_shape_mismatch_is_reported_at_the_memory_section():
    registry = new_registry()
    loaded = load_spec(SPECS / "titans_lmm_small.yaml", ["memory.out_proj=false", "memory.heads=4"], registry=registry)
    graph = lower(loaded)
    report = PassManager().run(graph, registry)
    (diag,) = report.diagnostics
    assert (diag.code, diag.stage, diag.path) == ("TC403", "shape_inference", "blocks.0.memory")
    assert "[B, T, 256]" in diag.message and "out_proj" in diag.hint
    assert report.ran == ["acyclic", "reachability", "shape_inference", "wiring"]
    assert report.skipped == ["backend"]  # shape inference failed


def test_wiring_pass_catches_a_rewired_mac():
    graph, registry = compiled("titans_mac_small")
    graph.remove_edge("L0.norm_memory", "L0.memory")
    graph.add_edge("L0.norm_mix", "L0.memory", port="x", recurrent=False)
    problems = check_wiring(graph, registry)
    assert [d.code for d in problems] == ["TC404"]
    assert "keys, values and queries must come from the attention output" in problems[0].message


def test_wiring_pass_catches_a_mag_branch_reading_the_attention():
    graph, registry = compiled("titans_mag_small")
    graph.remove_edge("L0.norm_mix", "L0.memory")
    graph.add_edge("L0.attention", "L0.memory", port="x", recurrent=False)
    assert any("queries must come from the block input" in d.message for d in check_wiring(graph, registry))


def test_wiring_pass_catches_a_mac_context_read_without_the_memory_state():
    graph, registry = compiled("titans_mac_small")
    graph.remove_edge("L0.memory", "L0.memory.read_ctx")
    problems = check_wiring(graph, registry)
    assert [d.message.split(": ", 1)[0] for d in problems] == ["L0.memory.read_ctx (memory_read)"]
    assert "read with the state before the segment" in problems[0].message


def _tiny_builder():
    builder = GraphBuilder(lambda path: Location("t.yaml", 7, 3))
    tokens = builder.add("input", "input", "model")
    x = builder.add("embed", "embed", "model", {"tokens": tokens}, dim=8)
    return builder, x


def test_cycle_is_found_and_dependent_passes_are_skipped():
    builder, x = _tiny_builder()
    a = builder.add("a", "norm", "blocks.0.norm", {"x": x}, features=8)
    b = builder.add("b", "norm", "blocks.0.norm", {"x": a}, features=8)
    builder.connect(b, a, "x2")
    builder.add("head", "head", "model", {"x": b}, dim=8, vocab_size=4)
    builder.add("out", "output", "model", {"x": "head"})
    report = PassManager().run(builder.graph, new_registry())
    assert [d.code for d in report.diagnostics] == ["TC401"]
    assert report.diagnostics[0].stage == "acyclic" and report.diagnostics[0].location.line == 7
    assert report.skipped == ["shape_inference", "wiring", "backend"]


def test_unreachable_and_dead_nodes():
    builder, x = _tiny_builder()
    builder.add("dead", "norm", "blocks.0.norm", {"x": x}, features=8)
    builder.add("orphan_norm", "norm", "blocks.0.norm", {}, features=8)
    builder.add("head", "head", "model", {"x": x}, dim=8, vocab_size=4)
    builder.add("out", "output", "model", {"x": "head"})
    messages = [d.message for d in PassManager().run(builder.graph, new_registry()).diagnostics]
    assert any("dead (norm): its result never reaches the model output" in m for m in messages)
    assert any("orphan_norm (norm): not reachable from the model input" in m for m in messages)


def test_pass_manager_orders_and_guards_passes():
    with pytest.raises(ValueError, match="requires"):
        PassManager([Pass("wiring", check_wiring, ("acyclic",))])
    with pytest.raises(ValueError, match="duplicate"):
        PassManager([DEFAULT_PASSES[0], DEFAULT_PASSES[0]])

    def crash(graph, registry):
        raise RuntimeError("bug in a pass")

    builder, _ = _tiny_builder()
    report = PassManager([Pass("crashy", crash)]).run(builder.graph, new_registry())
    assert [(d.code, d.stage) for d in report.diagnostics] == [("TC405", "crashy")]
    with pytest.raises(RuntimeError):
        PassManager([Pass("crashy", crash)], debug=True).run(builder.graph, new_registry())


def test_symbolic_dims_do_arithmetic_and_print_as_text():
    T = SymDim("T")
    assert SymDim("T", 4) == T + 4 and (T + 4) - 4 == T
    assert str(T + 4) == "T+4" and str(T) == "T" and str(T + 0) == "T"
    assert SymDim.parse("T+4") == T + 4 and SymDim.parse("B") == SymDim("B")
    assert SymDim("S", 4) != T + 4 and T != 4
    # the text of a shape written as strings (the form before SymDim) still compares and hashes equal
    assert (T + 4) == "T+4" and {T + 4: 1}["T+4"] == 1
    with pytest.raises(ShapeError, match="shorter than the 1 tokens removed"):
        T - 1
    with pytest.raises(ShapeError):
        SymDim.parse("T-4")
    with pytest.raises(ValueError):
        SymDim("4T")


def test_seq_offset_is_deprecated_but_works():
    with pytest.deprecated_call():
        assert seq_offset("T", 4) == SymDim("T", 4)
    with pytest.deprecated_call():
        assert seq_offset(SymDim("T", 4), -4) == SymDim("T")
    with pytest.deprecated_call():
        assert seq_offset(10, -3) == 7
    with pytest.raises(ShapeError), pytest.deprecated_call():
        seq_offset("T", -1)


@pytest.mark.parametrize("name", VARIANT_SPECS)
def test_renderings_show_every_node_and_the_recurrence(name):
    graph, _ = compiled(name)
    mermaid = to_mermaid(graph)
    dot = to_dot(graph)
    assert mermaid.startswith("flowchart TD")
    for node in graph.nodes:
        assert node.replace(".", "_") in mermaid
        assert f'"{node}"' in dot
    for i, layer in enumerate(graph.graph["layers"]):
        assert f"layer {i}: {layer['kind']}" in mermaid
    n_recurrent = sum(d["recurrent"] for _, _, d in graph.edges(data=True))
    assert mermaid.count("(recurrent)") == n_recurrent
    assert dot.count("style=dashed") == n_recurrent
    assert dot.count("{") == dot.count("}")


def test_backend_pass_records_the_choice_and_refuses_unknown_backends(monkeypatch):
    graph, _ = compiled("titans_mag_small")
    memories = [d for _, d in graph.nodes(data=True) if d["op"] == "memory"]
    assert memories and all(d["backend"] == "auto" and "CUDA" in d["backend_reason"] for d in memories)
    assert all(d["params"]["memory"].backend == "auto" for d in memories)  # the op the module is built from
    assert "backend=auto" in to_mermaid(graph)
    monkeypatch.setenv("TITANS_COMPOSE_BACKEND", "reference")
    graph, _ = compiled("titans_mag_small")
    memories = [d for _, d in graph.nodes(data=True) if d["op"] == "memory"]
    assert {d.get("backend") for d in memories} == {d["params"]["memory"].backend for d in memories} == {"reference"}
    monkeypatch.setenv("TITANS_COMPOSE_BACKEND", "warp-drive")
    registry = new_registry()
    loaded = load_spec(SPECS / "titans_mag_small.yaml", registry=registry)
    report = PassManager().run(lower(loaded), registry)
    assert [(d.code, d.stage) for d in report.diagnostics] == [("TC406", "backend")]


def test_repeated_blocks_are_drawn_once_with_a_count():
    from titans_compose.graph.render import collapse_repeats

    graph, _ = compiled("titans_mac_small", ["blocks=[{kind: mac, repeat: 3}, {kind: attention, repeat: 2}]"])
    view = collapse_repeats(graph)
    assert {d["layer"] for _, d in view.nodes(data=True)} == {None, 0, 3}
    assert view.has_edge("L0.add_mlp", "L3.norm_mix")  # the last mac copy feeds the first attention layer
    assert view.has_edge("L3.add_mlp", "final_norm") and view.has_edge("embed", "L0.norm_mix")
    assert nx.is_directed_acyclic_graph(dag_view(view))
    mermaid = to_mermaid(view)
    assert "layers 0-2: mac (blocks.0), 3 identical copies" in mermaid
    assert "layers 3-4: attention (blocks.1), 2 identical copies" in mermaid
    assert "L1_" not in mermaid and "L4_" not in mermaid
    assert view.number_of_nodes() == sum(d["layer"] in (None, 0, 3) for _, d in graph.nodes(data=True))
