"""``titans-compose ls``: registered names per kind, with their parameters and where they come from."""

from __future__ import annotations

import click

from titans_compose.cli.main import common_options, echo_diagnostics, guarded, load_registry, settings


@click.command()
@click.argument("kind", required=False)
@common_options
@click.pass_context
def ls(ctx: click.Context, kind: str | None, sub_plugins: tuple[str, ...], sub_debug: bool) -> None:
    """List registered names (all kinds, or one KIND: memory, loss, retention, optimizer, activation, block,
    attention)."""
    plugins, debug = settings(ctx, sub_plugins, sub_debug)

    def body() -> int:
        from titans_compose.errors import did_you_mean
        from titans_compose.registry import KINDS

        if kind is not None and kind not in KINDS:
            raise click.UsageError(f"unknown kind '{kind}': {did_you_mean(kind, list(KINDS))}")
        registry, problems = load_registry(plugins, debug)
        echo_diagnostics(problems)
        for k in [kind] if kind else list(KINDS):
            entries = registry.entries(k)
            click.echo(click.style(f"{k}", bold=True) + f"  ({KINDS[k]})")
            rows = [(e.name, e.param_summary() or "-", e.source, e.description) for e in entries]
            widths = [max(len(r[i]) for r in rows) for i in range(3)] if rows else [0, 0, 0]
            for row in rows:
                click.echo(
                    "  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
                )
            click.echo()
        return 1 if problems else 0

    guarded(ctx, debug, body)
