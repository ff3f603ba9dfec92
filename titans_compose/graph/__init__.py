"""The graph IR: lowering a validated spec, the checking passes, and rendering."""

from __future__ import annotations

import networkx as nx

from titans_compose.errors import SpecError, dedupe
from titans_compose.graph.lower import lower
from titans_compose.graph.passes import DEFAULT_PASSES, Pass, PassManager, PassReport
from titans_compose.spec.validate import LoadedSpec

__all__ = ["DEFAULT_PASSES", "Pass", "PassManager", "PassReport", "compile_graph", "lower"]


def compile_graph(loaded: LoadedSpec, *, debug: bool = False) -> tuple[nx.DiGraph, PassReport]:
    """Lower ``loaded`` and run the default passes. Raises :class:`SpecError` if lowering or a pass fails."""
    graph = lower(loaded)
    report = PassManager(debug=debug).run(graph, loaded.registry)
    if not report.ok:
        raise SpecError(dedupe(report.diagnostics))
    return graph, report
