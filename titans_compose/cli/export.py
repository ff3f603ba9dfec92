"""``titans-compose export``: a self-contained, verifiable artifact of a spec's or a build's model."""

from __future__ import annotations

from pathlib import Path

import click

from titans_compose.cli.main import guarded, model_registry, out_option, settings, spec_options


def _shape(text: str) -> tuple[int, int]:
    batch, sep, tokens = text.partition("x")
    if not sep or not batch.isdigit() or not tokens.isdigit() or int(batch) < 1 or int(tokens) < 1:
        raise click.BadParameter(f"{text!r}: expected BATCHxTOKENS, e.g. 2x64", param_hint="'--example'")
    return int(batch), int(tokens)


@click.command()
@click.argument("source", metavar="SPEC|BUILD_DIR|RUN_DIR", type=click.Path(exists=True))
@out_option("out", "Artifact directory (new or empty).", required=True, type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["artifact", "torch-export", "hf"]),
    default="artifact",
    show_default=True,
    help="torch-export also writes program.pt2, an ExportedProgram of the forward, checked against the module; hf "
    "writes a transformers save_pretrained directory instead (needs the hf extra).",
)
@click.option("--example", default="2x64", show_default=True, help="torch-export: the BATCHxTOKENS traced.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the initial weights of a SPEC.")
@click.option(
    "--step",
    type=click.IntRange(min=1),
    help="RUN_DIR: the checkpoint of this step [default: the newest].",
)
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="hf: the tokenizers JSON file the model was trained with [default: UTF-8 bytes].",
)
@spec_options
@click.pass_context
def export(
    ctx: click.Context,
    source: str,
    out: Path,
    fmt: str,
    example: str,
    seed: int,
    step: int | None,
    tokenizer: Path | None,
    overrides: tuple[str, ...],
    sub_plugins: tuple[str, ...],
    sub_debug: bool,
) -> None:
    """Export SPEC (its initial weights), a BUILD_DIR (verified) or a RUN_DIR of `titans-compose train` (the trained
    weights of its newest checkpoint, or of --step) to --out: the resolved spec, safetensors weights and a manifest
    of hashes and versions that `titans_compose.load(OUT)` verifies and loads as a plain nn.Module. A BUILD_DIR or
    RUN_DIR made with plug-in files or modules needs them passed again with --plugin: none is imported on the
    build's word. --format hf writes a transformers save_pretrained directory instead (also of an exported
    artifact)."""
    plugins, debug = settings(ctx, sub_plugins, sub_debug)
    shape = _shape(example)
    if tokenizer is not None and fmt != "hf":
        raise click.BadParameter("a tokenizer is part of a --format hf export only", param_hint="'--tokenizer'")

    def body() -> int:
        from titans_compose.builder import BuildError
        from titans_compose.export import ExportError
        from titans_compose.export import export as run

        if model_registry(plugins, debug) is None:
            return 1
        if fmt == "hf":
            return _export_hf(source, out, overrides, plugins, seed, step, tokenizer)
        try:
            done = run(
                source,
                out,
                overrides=overrides,
                plugins=plugins,
                seed=seed,
                torch_export=fmt != "artifact",
                example=shape,
                step=step,
            )
        except (BuildError, ExportError) as exc:
            raise click.ClickException(str(exc)) from None
        if "trained" in done.manifest:
            click.echo(f"trained weights of step {done.manifest['trained']['step']} of the run in {source}")
        files = ", ".join(done.manifest["files"])
        kernels = len(done.manifest["kernels"])
        click.echo(f"wrote {out}/ ({files}; {kernels} generated kernel source{'s' * (kernels != 1)}; manifest.json)")
        if done.program_max_diff is not None:
            click.echo(
                f"program.pt2 checked: logits equal the module's (max abs difference {done.program_max_diff:.3g})"
            )
        with_plugins = f", plugins={list(plugins)!r}" if plugins else ""
        click.echo(f"load it with: titans_compose.load({str(out)!r}{with_plugins})")
        return 0

    guarded(ctx, debug, body)


def _export_hf(
    source: str,
    out: Path,
    overrides: tuple[str, ...],
    plugins: tuple[str, ...],
    seed: int,
    step: int | None,
    tokenizer: Path | None,
) -> int:
    """``--format hf``: a transformers save_pretrained directory (titans_compose.hf)."""
    try:
        from titans_compose.hf.export import HFExportError, export_hf
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    from titans_compose.builder import BuildError
    from titans_compose.export import ExportError

    try:
        model = export_hf(source, out, overrides=overrides, plugins=plugins, seed=seed, step=step, tokenizer=tokenizer)
    except (BuildError, ExportError, HFExportError) as exc:
        raise click.ClickException(str(exc)) from None
    with_plugins = f", plugins={list(plugins)!r}" if plugins else ""
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
    click.echo(f"wrote {out}/ ({files}; tokenizer: {model.config.tokenizer['kind']})")
    click.echo(
        f"load it with: import titans_compose.hf; AutoModelForCausalLM.from_pretrained({str(out)!r}{with_plugins})"
    )
    return 0
