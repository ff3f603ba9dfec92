"""``titans-compose build``: compile a spec into a PyTorch model, smoke-check it and write a verifiable build."""

from __future__ import annotations

from pathlib import Path

import click

from titans_compose.cli.main import SEED, echo_diagnostics, guarded, model_registry, out_option, settings, spec_options


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@out_option(
    "output",
    "Build directory (default: build/<spec name>/). It must be new, empty, or an earlier build.",
    type=click.Path(),
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for the initial weights.")
@click.option("--no-smoke", is_flag=True, help="Skip the one-step forward/backward smoke check.")
@click.option("--graph", "show_graph", is_flag=True, help="Print the graph as Mermaid text instead of the layer table.")
@spec_options
@click.pass_context
def build(
    ctx: click.Context,
    spec: str,
    output: str | None,
    seed: int,
    no_smoke: bool,
    show_graph: bool,
    overrides: tuple[str, ...],
    sub_plugins: tuple[str, ...],
    sub_debug: bool,
) -> None:
    """Build SPEC: the model, its report, and a build directory that `load_build` verifies and reloads."""
    plugins, debug = settings(ctx, sub_plugins, sub_debug)

    def body() -> int:
        from titans_compose.builder import BuildError, build, spec_name
        from titans_compose.io import default_dir
        from titans_compose.spec import load_spec

        registry = model_registry(plugins, debug)
        if registry is None:
            return 1
        loaded = load_spec(spec, overrides, registry=registry)
        echo_diagnostics(loaded.warnings)
        out = Path(output) if output is not None else default_dir("build", spec_name(loaded))
        try:
            result = build(loaded, plugins=plugins, output_dir=out, seed=seed, smoke=not no_smoke)
        except BuildError as exc:
            raise click.ClickException(str(exc)) from None
        graph = None
        if show_graph:
            from titans_compose.graph.render import collapse_repeats, to_mermaid

            graph = to_mermaid(collapse_repeats(result.graph))
        click.echo(result.report.summary(graph))
        click.echo(f"wrote {out}/ (manifest.json lists every file with its sha256)")
        return 0

    guarded(ctx, debug, body)
