"""``titans-compose data tokenize``: text files to a token file (:mod:`titans_compose.train.tokens`) with a tokenizer
file of the ``tokenizers`` library (the optional extra ``[data]``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from titans_compose.cli.main import guarded, settings

#: separator tokens looked up in a tokenizer when ``--separator`` is not given, in this order
SEPARATOR_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]", "<|eos|>")


@click.group()
def data() -> None:
    """Prepare training data."""


def load_tokenizer(path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` from its JSON file; a clear error if the library is missing or the file is bad."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise click.ClickException(
            "titans-compose data tokenize needs the tokenizers library: pip install tokenizers numpy (or pip install "
            '-e ".[data]")'
        ) from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises its own exception types for any malformed file
        raise click.BadParameter(
            f"{path}: not a tokenizers tokenizer file ({exc})", param_hint="'--tokenizer'"
        ) from None


def separator_id(tokenizer: Any, separator: str | None) -> int | None:
    """The separator's id: ``separator`` given as a token or an id, ``none`` for no separator, else the first of
    :data:`SEPARATOR_NAMES` the tokenizer knows."""
    if separator == "none":
        return None
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if separator is None:
        found = [tokenizer.token_to_id(name) for name in SEPARATOR_NAMES]
        ids = [i for i in found if i is not None]
        if not ids:
            raise click.BadParameter(
                f"the tokenizer has none of {', '.join(SEPARATOR_NAMES)}: name its separator token or id, or "
                "'none' to pack documents without one",
                param_hint="'--separator'",
            )
        return ids[0]
    if separator.isdigit():
        if int(separator) >= vocab:
            raise click.BadParameter(
                f"id {separator} is not below the vocabulary of {vocab}", param_hint="'--separator'"
            )
        return int(separator)
    token = tokenizer.token_to_id(separator)
    if token is None:
        raise click.BadParameter(f"the tokenizer has no token {separator!r}", param_hint="'--separator'")
    return token


@data.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tokenizer", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o", "--out", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="OUT.bin"
)
@click.option(
    "--separator",
    help="Token or id put before every document (each input file is one): default the tokenizer's end-of-text token; "
    "'none' for no separator.",
)
@click.option("--debug", "sub_debug", is_flag=True, help="Show tracebacks for internal errors.")
@click.pass_context
def tokenize(
    ctx: click.Context, inputs: tuple[Path, ...], tokenizer: Path, out: Path, separator: str | None, sub_debug: bool
) -> None:
    """Tokenise INPUT text files into OUT (a flat uint16/uint32 token file) and OUT.json (its dtype, vocab_size,
    tokenizer and separator), for `titans-compose train --tokens OUT`."""
    _, debug = settings(ctx, (), sub_debug)

    def body() -> int:
        from titans_compose.train.data import DataError
        from titans_compose.train.tokens import numpy_module, write_tokens

        tok = load_tokenizer(tokenizer)
        sep = separator_id(tok, separator)
        try:
            np = numpy_module()
        except DataError as exc:
            raise click.ClickException(str(exc)) from None

        def documents() -> Iterator[Any]:  # one file at a time: the corpus never sits in memory whole
            for path in inputs:
                try:
                    text = path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    raise click.BadParameter(
                        f"{path}: not readable UTF-8 text ({exc})", param_hint="'INPUTS'"
                    ) from None
                ids = tok.encode(text, add_special_tokens=False).ids
                yield np.asarray(ids if sep is None else [sep, *ids], dtype=np.int64)

        vocab = tok.get_vocab_size(with_added_tokens=True)
        written = write_tokens(out, documents(), vocab_size=vocab, tokenizer=tokenizer.name, separator=sep)
        click.echo(
            f"wrote {out} ({len(written):,} tokens of {len(inputs)} documents, {written.ids.dtype.name}, vocabulary "
            f"{written.vocab_size:,}, separator {sep}) and {out}.json"
        )
        return 0

    guarded(ctx, debug, body)
