"""``titans-compose validate``: load, validate and lower specs, reporting every problem with its location."""

from __future__ import annotations

import click

from titans_compose.cli.main import echo_diagnostics, guarded, load_registry, settings, spec_options


@click.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("--resolved", is_flag=True, help="Print each fully resolved spec (every default) as YAML.")
@spec_options
@click.pass_context
def validate(
    ctx: click.Context,
    specs: tuple[str, ...],
    resolved: bool,
    overrides: tuple[str, ...],
    sub_plugins: tuple[str, ...],
    sub_debug: bool,
) -> None:
    """Check SPECS: YAML, schema, cross-field rules and the graph passes. Exit status 1 if any spec is bad or a
    plug-in failed to load (the specs are still checked, with what did load, but none is reported ok)."""
    plugins, debug = settings(ctx, sub_plugins, sub_debug)

    def body() -> int:
        from titans_compose.errors import SpecError
        from titans_compose.graph import compile_graph
        from titans_compose.spec import load_spec

        registry, problems = load_registry(plugins, debug)
        echo_diagnostics(problems)
        failed = bool(problems)
        for path in specs:
            try:
                loaded = load_spec(path, overrides, registry=registry)
                graph, report = compile_graph(loaded, debug=debug)
            except SpecError as exc:
                echo_diagnostics(exc.diagnostics)
                failed = True
                continue
            echo_diagnostics(loaded.warnings)
            if problems:  # checked without a plug-in that failed: not ok
                continue
            if resolved:
                click.echo(loaded.resolved_yaml())
            else:
                layers = len(graph.graph["layers"])
                click.echo(
                    f"ok: {path}: {layers} layers, {graph.number_of_nodes()} graph nodes, "
                    f"passes {', '.join(report.ran)}"
                )
        return 1 if failed else 0

    guarded(ctx, debug, body)
