"""``titans-compose cache ls|clear``: the generated kernel sources on disk (never imports torch or triton)."""

from __future__ import annotations

import datetime as dt
import json

import click

from titans_compose.cli.main import guarded, settings

_debug = click.option("--debug", "sub_debug", is_flag=True, help="Show tracebacks for internal errors.")


@click.group()
def cache() -> None:
    """The cache of generated Triton kernel sources ($TITANS_COMPOSE_CACHE, else ~/.cache/titans_compose/ops/memory)."""


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n >= 1024 else f"{n} B"


def _key_summary(key: dict | None) -> str:
    """The key's sizes and options in one line, or why there is none."""
    if key is None:
        return "(no kernel key in the header)"
    try:
        shapes = " ".join(f"{o}x{i}" for o, i in key["layer_shapes"])
        options = [key["activation"], key["loss"], f"chunk {key['chunk_size']}", key["retrieval"], key["dtype"]]
        options += [name for name in ("momentum", "forget", "residual", "output_norm") if key.get(name)]
        versions = key["versions"]
        built = f"generator {versions['generator']}, triton {versions['triton']}, torch {versions['torch']}"
    except (KeyError, TypeError, ValueError):
        return "(kernel key in the header not understood)"
    return f"layers {shapes}; {', '.join(map(str, options))}; {built}"


@cache.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
@_debug
@click.pass_context
def ls(ctx: click.Context, as_json: bool, sub_debug: bool) -> None:
    """List the cached kernel sources: file, size, modification time, the kernel key they were generated for, and
    any that do not match the sha256 recorded when they were written."""
    _, debug = settings(ctx, (), sub_debug)

    def body() -> int:
        from titans_compose.ops.memory.codegen.cache import cache_dir, entries

        directory, found = cache_dir(), entries()
        if as_json:
            click.echo(json.dumps({"directory": str(directory), "entries": [e.to_json() for e in found]}, indent=2))
            return 0
        total = sum(e.size for e in found)
        click.echo(f"{directory}: {len(found)} kernel source{'s' * (len(found) != 1)}, {_size(total)}")
        for e in found:
            when = dt.datetime.fromtimestamp(e.mtime).strftime("%Y-%m-%d %H:%M")
            unverified = "" if e.verified else "  (does not match its recorded sha256: generated again when needed)"
            click.echo(f"  {e.path.name}  {_size(e.size)}  {when}{unverified}")
            click.echo(f"      {_key_summary(e.key)}")
        return 0

    guarded(ctx, debug, body)


@cache.command()
@_debug
@click.pass_context
def clear(ctx: click.Context, sub_debug: bool) -> None:
    """Delete every cached kernel source and its recorded sha256 (they are generated again when next needed)."""
    _, debug = settings(ctx, (), sub_debug)

    def body() -> int:
        from titans_compose.ops.memory.codegen.cache import cache_dir, clear

        done = clear()
        temporaries = f" and {done.temporaries} unfinished temporary file(s)" if done.temporaries else ""
        click.echo(f"{cache_dir()}: removed {done.sources} kernel source(s){temporaries}, {_size(done.bytes)} freed")
        return 0

    guarded(ctx, debug, body)
