"""Lowering: a validated spec -> the graph IR (embeddings, one lowered block per layer, final norm, LM head)."""

from __future__ import annotations

import networkx as nx

from titans_compose.errors import Diagnostic, SpecError
from titans_compose.graph.blocks import LowerContext
from titans_compose.graph.ir import GraphBuilder
from titans_compose.spec.validate import LoadedSpec


def lower(loaded: LoadedSpec) -> nx.DiGraph:
    """Build the graph of ``loaded``. Layers are recorded in ``graph.graph["layers"]`` as dicts with ``index``,
    ``block`` (index in ``blocks``), ``kind``, ``input`` and ``output`` node ids."""
    spec = loaded.spec
    builder = GraphBuilder(loaded.location)
    g = builder.graph
    g.graph["name"] = spec.name or loaded.source
    g.graph["source"] = loaded.source
    tokens = builder.add("input", "input", "model", vocab_size=spec.model.vocab_size)
    x = builder.add(
        "embed",
        "embed",
        "model",
        {"tokens": tokens},
        vocab_size=spec.model.vocab_size,
        dim=spec.model.dim,
        tied=spec.model.tie_embeddings,
    )
    layer = 0
    for i, block in enumerate(spec.blocks):
        entry = loaded.registry.get("block", block.kind)
        for _ in range(block.repeat):
            builder.layer, builder.prefix = layer, f"L{layer}."
            record = {"index": layer, "block": i, "kind": block.kind, "input": x}
            ctx = LowerContext(builder, block, spec.model, f"blocks.{i}", loaded.registry)
            try:
                x = entry.obj.lower(ctx, x)
            except Exception as exc:
                raise SpecError(
                    [
                        Diagnostic(
                            "TC405",
                            f"lowering a '{block.kind}' block failed: {type(exc).__name__}: {exc}",
                            f"blocks.{i}",
                            loaded.location(f"blocks.{i}"),
                            f"the block kind comes from {entry.source}; run with --debug for the traceback",
                            stage="lower",
                        )
                    ]
                ) from exc
            record["output"] = x
            g.graph["layers"].append(record)
            layer += 1
    builder.layer, builder.prefix = None, ""
    x = builder.add(
        "final_norm",
        "norm",
        "norm",
        {"x": x},
        kind=spec.norm.kind,
        eps=spec.norm.eps,
        features=spec.model.dim,
    )
    logits = builder.add(
        "head",
        "head",
        "model",
        {"x": x},
        dim=spec.model.dim,
        vocab_size=spec.model.vocab_size,
        tied=spec.model.tie_embeddings,
    )
    builder.add("output", "output", "model", {"x": logits})
    return g
