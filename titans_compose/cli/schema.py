"""``titans-compose schema``: the JSON Schema of the spec language (plug-in names included)."""

from __future__ import annotations

import click

from titans_compose.cli.main import common_options, echo_diagnostics, emit, guarded, load_registry, settings


@click.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to this file instead of stdout.")
@common_options
@click.pass_context
def schema(ctx: click.Context, output: str | None, sub_plugins: tuple[str, ...], sub_debug: bool) -> None:
    """Print the JSON Schema of spec files, for editors (yaml-language-server) and tools."""
    plugins, debug = settings(ctx, sub_plugins, sub_debug)

    def body() -> int:
        from titans_compose.spec.schema import json_schema_text

        registry, problems = load_registry(plugins, debug)
        echo_diagnostics(problems)
        emit(output, json_schema_text(registry), "JSON Schema")
        return 1 if problems else 0

    guarded(ctx, debug, body)
