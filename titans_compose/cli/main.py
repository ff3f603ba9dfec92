"""The ``titans-compose`` command line.

Subcommands are imported lazily, so ``validate``, ``graph``, ``schema`` and ``ls`` never import torch. Every
command reports spec problems as located diagnostics with exit status 1, and so are problems of the user's
environment (a full disk, a read-only or forbidden output path, a memory backend that cannot run here); an
unexpected failure prints one line (exit status 3) and its traceback only with ``--debug``.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from titans_compose.click_types import SEED, FiniteFloat  # noqa: F401  (their old home: re-exported)

#: subcommand -> (module, attribute, one-line help). The help is here so `--help` imports nothing.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "validate": (
        "titans_compose.cli.validate",
        "validate",
        "Check specs: schema, cross-field rules and graph.",
    ),
    "graph": ("titans_compose.cli.graph", "graph", "Print or write a spec's graph IR (DOT, Mermaid or PNG)."),
    "schema": ("titans_compose.cli.schema", "schema", "Print the JSON Schema of the spec language."),
    "ls": ("titans_compose.cli.ls", "ls", "List registered names with their parameters and source."),
    "build": ("titans_compose.cli.build", "build", "Compile a spec into a smoke-checked model and a verifiable build."),
    "train": ("titans_compose.cli.train", "train", "Train a spec's model on offline text or a long-context task."),
    "data": ("titans_compose.cli.data", "data", "Prepare training data: tokenise text into a token file."),
    "cache": ("titans_compose.cli.cache", "cache", "List or clear the cached generated kernel sources."),
    "sweep": ("titans_compose.cli.sweep", "sweep", "Build, train and compare every point of a sweep file."),
    "export": ("titans_compose.cli.export", "export", "Export a model as a verifiable artifact to train elsewhere."),
}

EXIT_SPEC_ERROR = 1
EXIT_INTERNAL = 3
#: OSError numbers that describe the user's environment (space, quota, permissions), not a bug: exit status 1
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG})


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][2]) for name in sorted(COMMANDS)])

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in COMMANDS:
            import difflib

            close = difflib.get_close_matches(name, list(COMMANDS), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            ctx.fail(f"No such command '{name}'.{hint} Commands: {', '.join(sorted(COMMANDS))}.")
        return super().resolve_command(ctx, args)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="MODULE_OR_FILE",
    help="Load a plug-in (a module name or a .py file with register(registry)). Repeatable.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks for internal errors and plug-in failures.")
@click.version_option(package_name="titans_compose", prog_name="titans-compose")
@click.pass_context
def cli(ctx: click.Context, plugins: tuple[str, ...], debug: bool) -> None:
    """titans_compose: declare Titans neural-memory models in YAML, check them, and compile them."""
    ctx.ensure_object(dict)
    ctx.obj["plugins"] = list(plugins)
    ctx.obj["debug"] = debug


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--plugin`` and ``--debug`` on a subcommand too, so they may follow the subcommand's name."""
    fn = click.option("--debug", "sub_debug", is_flag=True, help="Show tracebacks for internal errors.")(fn)
    return click.option(
        "--plugin",
        "sub_plugins",
        multiple=True,
        metavar="MODULE_OR_FILE",
        help="Load a plug-in (module name or .py file). Repeatable.",
    )(fn)


def spec_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--set path=value`` overrides for commands that take a spec."""
    return click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="PATH=VALUE",
        help="Override a spec value, e.g. --set memory.depth=3. Repeatable.",
    )(common_options(fn))


def out_option(dest: str, help: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The output directory option, spelled ``-o``, ``--out`` or ``--output`` on every command that writes one."""
    return click.option("-o", "--out", "--output", dest, help=help, **kwargs)


def check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A ``--device`` callback: the device must parse and hold a tensor here (``cuda`` without CUDA, ``cuda:3`` on
    a one-GPU machine, ``mps`` off a Mac are usage errors naming the option, not failures inside torch)."""
    if value is None:
        return None
    import torch

    try:
        torch.empty(0, device=torch.device(value))
    except (RuntimeError, ValueError, AssertionError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise click.BadParameter(f"{value!r} cannot be used here: {reason}", ctx, param) from None
    return value


def device_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--device``, checked by :func:`check_device`."""
    return click.option(
        "--device",
        default=None,
        callback=check_device,
        help="torch device [default: cuda if available, else cpu].",
    )(fn)


def settings(ctx: click.Context, sub_plugins: tuple[str, ...], sub_debug: bool) -> tuple[list[str], bool]:
    """Merge the group's and the subcommand's ``--plugin`` / ``--debug``."""
    obj = ctx.find_root().obj or {}
    return [*obj.get("plugins", []), *sub_plugins], bool(obj.get("debug")) or sub_debug


def echo_diagnostics(diagnostics: list[Any]) -> None:
    for d in diagnostics:
        click.echo(d.render(), err=True)


def guarded(ctx: click.Context, debug: bool, body: Callable[[], int]) -> None:
    """Run ``body``; turn spec errors into diagnostics (exit 1) and anything unexpected into one line (exit 3)."""
    from titans_compose.errors import SpecError

    try:
        code = body()
    except SpecError as exc:
        echo_diagnostics(exc.diagnostics)
        ctx.exit(EXIT_SPEC_ERROR)
    except (click.exceptions.Exit, click.ClickException, click.Abort):
        raise
    except Exception as exc:
        if debug:
            raise
        problem = environment_problem(exc)
        if problem is not None:
            click.echo(f"titans-compose: error: {problem}", err=True)
            ctx.exit(EXIT_SPEC_ERROR)
        click.echo(f"titans-compose: internal error: {type(exc).__name__}: {exc}", err=True)
        click.echo("    hint: run again with --debug for the traceback, and please report it", err=True)
        ctx.exit(EXIT_INTERNAL)
    ctx.exit(code)


def environment_problem(exc: BaseException) -> str | None:
    """What ``exc`` says about the user's environment (a full disk, a read-only or forbidden path, a memory backend
    that cannot run on this machine), or None if it is not such a problem."""
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{os.strerror(exc.errno)}{where} (free space, fix the permissions or choose another path)"
    dispatch = sys.modules.get("titans_compose.ops.memory.dispatch")  # not imported: the error cannot be its
    if dispatch is not None and isinstance(exc, dispatch.BackendUnavailable):
        return str(exc)
    return None


def emit(output: str | None, data: str | bytes, note: str) -> None:
    """Print ``data``, or write it atomically to ``output`` and say so on stderr."""
    if output is None:
        click.echo(data, nl=False)
        return
    from titans_compose.io import atomic_write

    atomic_write(output, data)
    click.echo(f"wrote {output} ({note})", err=True)


def load_registry(plugins: list[str], debug: bool) -> tuple[Any, list[Any]]:
    from titans_compose.registry import default_registry

    return default_registry(plugins, debug=debug)


def model_registry(plugins: list[str], debug: bool) -> Any | None:
    """The registry for a command that builds torch modules, or None after printing why a plug-in failed.

    Also silences torch's import-time warning about a missing NumPy (the CPU wheel warns; nothing here needs it)."""
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    registry, problems = load_registry(plugins, debug)
    echo_diagnostics(problems)
    return None if problems else registry


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="titans-compose")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
