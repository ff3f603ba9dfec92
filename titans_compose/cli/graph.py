"""``titans-compose graph``: the checked graph IR of a spec as Mermaid, DOT or PNG."""

from __future__ import annotations

from pathlib import Path

import click

from titans_compose.cli.main import echo_diagnostics, emit, guarded, load_registry, settings, spec_options


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mermaid", "dot", "png"]),
    default="mermaid",
    show_default=True,
    help="Output format; png needs Graphviz's `dot` and -o.",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to this file instead of stdout.")
@click.option("--all-layers", is_flag=True, help="Draw every copy of a repeated block (by default: one, with a count).")
@spec_options
@click.pass_context
def graph(
    ctx: click.Context,
    spec: str,
    fmt: str,
    output: str | None,
    all_layers: bool,
    overrides: tuple[str, ...],
    sub_plugins: tuple[str, ...],
    sub_debug: bool,
) -> None:
    """Lower SPEC to the graph IR, run the passes and print the graph."""
    plugins, debug = settings(ctx, sub_plugins, sub_debug)
    if fmt == "png" and output is None:
        raise click.UsageError("--format png writes binary data: give an output file with -o FILE.png")
    if output is not None and Path(output).resolve() == Path(spec).resolve():
        raise click.UsageError(f"refusing to overwrite the spec {spec} with its graph: choose another -o")

    def body() -> int:
        from titans_compose.graph import compile_graph
        from titans_compose.graph.render import GraphvizMissing, collapse_repeats, to_dot, to_mermaid, to_png
        from titans_compose.spec import load_spec

        registry, problems = load_registry(plugins, debug)
        echo_diagnostics(problems)
        loaded = load_spec(spec, overrides, registry=registry)
        echo_diagnostics(loaded.warnings)
        g, _ = compile_graph(loaded, debug=debug)
        if not all_layers:
            g = collapse_repeats(g)
        if fmt == "png":
            try:
                data: str | bytes = to_png(g)
            except GraphvizMissing as exc:
                click.echo(f"titans-compose: {exc}", err=True)
                return 1
        else:
            data = to_dot(g) if fmt == "dot" else to_mermaid(g)
        emit(output, data, f"{fmt}, {g.number_of_nodes()} nodes")
        return 1 if problems else 0

    guarded(ctx, debug, body)
