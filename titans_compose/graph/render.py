"""Rendering the graph IR for people: Graphviz DOT, Mermaid, and PNG (through Graphviz's `dot`, if installed).

Layers become clusters / subgraphs; the recurrent edge of a memory's state (MAC's context read) is dashed. Labels
show the op, its key settings and, after shape inference, the output shape.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import networkx as nx

from titans_compose.graph.ir import fmt_shape

_DETAIL_KEYS = {
    "proj": ("role", "out_features", "activation"),
    "conv": ("kernel",),
    "norm": ("kind",),
    "memory": ("chunk_size", "retrieval", "init"),
    "memory_read": ("retrieval",),
    "attention": ("kind", "window", "segment", "heads"),
    "gate": ("form",),
    "mlp": ("kind", "hidden"),
    "persistent": ("tokens",),
    "slice": ("drop_prefix",),
}


def _label_parts(node: str, data: dict) -> list[str]:
    name = node.split(".", 1)[1] if data.get("layer") is not None and "." in node else node
    params = data.get("params", {})
    op = params.get("memory")  # a memory node's settings are its MemoryOp's fields
    details = []
    for key in _DETAIL_KEYS.get(data["op"], ()):
        value = params.get(key, getattr(op, key, None))
        if value is None or (key == "window" and params.get("kind") == "segment"):
            continue
        if isinstance(value, list):
            value = ",".join(map(str, value))
        details.append(f"{key}={value}")
    if data.get("backend"):
        details.append(f"backend={data['backend']}")
    parts = [f"{name} : {data['op']}"]
    if details:
        parts.append(" ".join(details))
    if data["op"] == "memory":
        weights = [f"W{n} {o}x{i}" for n, (o, i) in enumerate(op.layer_shapes, start=1)]
        momentum = " + momentum" if op.momentum.enabled else ""
        parts.append(f"state per batch x {op.heads} heads: {', '.join(weights)}{momentum}")
    shape = data.get("shape")
    if shape is not None:
        parts.append(fmt_shape(shape))
    return parts


def _layers(graph: nx.DiGraph) -> dict[int | None, list[str]]:
    groups: dict[int | None, list[str]] = {}
    for node, data in graph.nodes(data=True):
        groups.setdefault(data.get("layer"), []).append(node)
    return groups


def _layer_title(graph: nx.DiGraph, index: int) -> str:
    layer = next(rec for rec in graph.graph["layers"] if rec["index"] == index)
    copies = layer.get("copies", 1)
    if copies == 1:
        return f"layer {index}: {layer['kind']} (blocks.{layer['block']})"
    return f"layers {index}-{index + copies - 1}: {layer['kind']} (blocks.{layer['block']}), {copies} identical copies"


def collapse_repeats(graph: nx.DiGraph) -> nx.DiGraph:
    """A view for people: the copies of a repeated block are drawn once (their layers are identical by
    construction); the chain between the copies is left out and the title says how many there are."""
    layers = graph.graph["layers"]
    first_of: dict[int, int] = {}
    kept = []
    for rec in layers:
        group = [r for r in layers if r["block"] == rec["block"]]
        first_of[rec["index"]] = group[0]["index"]
        if rec is group[0]:
            kept.append({**rec, "copies": len(group)})

    def fold(node: str) -> str:
        layer = graph.nodes[node].get("layer")
        if layer is None or first_of[layer] == layer:
            return node
        return f"L{first_of[layer]}.{node.split('.', 1)[1]}"

    out = nx.DiGraph(**{**graph.graph, "layers": kept})
    for node, data in graph.nodes(data=True):
        if fold(node) == node:
            out.add_node(node, **data)
    for u, v, data in graph.edges(data=True):
        lu, lv = graph.nodes[u].get("layer"), graph.nodes[v].get("layer")
        if lu is not None and lv is not None and lu != lv and first_of[lu] == first_of[lv]:
            continue  # the chain from one copy to the next
        a, b = fold(u), fold(v)
        if a != b and not out.has_edge(a, b):
            out.add_edge(a, b, **data)
    return out


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz DOT text of the graph."""

    def q(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        f"digraph {q(str(graph.graph.get('name', 'model')))} {{",
        "  rankdir=TB;",
        '  node [shape=box, fontname="Helvetica", fontsize=10];',
    ]
    for layer, nodes in _layers(graph).items():
        indent = "  "
        if layer is not None:
            lines.append(f"  subgraph cluster_{layer} {{")
            lines.append(f"    label={q(_layer_title(graph, layer))};")
            indent = "    "
        for node in nodes:
            data = graph.nodes[node]
            style = ', style="rounded,filled", fillcolor="#fde9c9"' if data["op"].startswith("memory") else ""
            lines.append(f"{indent}{q(node)} [label={q(chr(10).join(_label_parts(node, data)))}{style}];")
        if layer is not None:
            lines.append("  }")
    for u, v, data in graph.edges(data=True):
        attrs = [f"label={q(data.get('port', ''))}"]
        if data.get("recurrent"):
            attrs.append('style=dashed, constraint=false, color="#c05000"')
        lines.append(f"  {q(u)} -> {q(v)} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(graph: nx.DiGraph) -> str:
    """Mermaid flowchart text of the graph (renders on GitHub and in most Markdown viewers)."""
    ids = {node: re.sub(r"\W", "_", node) for node in graph.nodes}

    def label(node: str) -> str:
        text = "<br/>".join(_label_parts(node, graph.nodes[node]))
        return text.replace('"', "'")

    lines = ["flowchart TD"]
    for layer, nodes in _layers(graph).items():
        indent = "  "
        if layer is not None:
            lines.append(f'  subgraph layer{layer}["{_layer_title(graph, layer)}"]')
            indent = "    "
        for node in nodes:
            shape = ('[("', '")]') if graph.nodes[node]["op"] == "memory" else ('["', '"]')
            lines.append(f"{indent}{ids[node]}{shape[0]}{label(node)}{shape[1]}")
        if layer is not None:
            lines.append("  end")
    for u, v, data in graph.edges(data=True):
        port = data.get("port", "")
        arrow = f"-. {port} (recurrent) .->" if data.get("recurrent") else f"-- {port} -->"
        lines.append(f"  {ids[u]} {arrow} {ids[v]}")
    return "\n".join(lines) + "\n"


class GraphvizMissing(RuntimeError):
    """Graphviz's `dot` program is not installed."""


def to_png(graph: nx.DiGraph) -> bytes:
    """PNG bytes rendered by Graphviz's `dot`; raises :class:`GraphvizMissing` when it is not installed."""
    dot = shutil.which("dot")
    if dot is None:
        raise GraphvizMissing(
            "PNG output needs Graphviz's `dot` program, which is not installed "
            "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz); "
            "or use --format dot / --format mermaid"
        )
    result = subprocess.run([dot, "-Tpng"], input=to_dot(graph).encode(), capture_output=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"dot failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout
