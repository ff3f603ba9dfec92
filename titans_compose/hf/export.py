"""``titans-compose export ... --format hf``: a model as a transformers ``save_pretrained`` directory.

The directory holds ``config.json`` (the resolved spec, its hash, the seed, the plug-in records and the tokeniser),
``model.safetensors`` (no pickle), ``generation_config.json``, the tokeniser's files (the byte tokeniser's
``tokenizer_config.json``, or a ``tokenizers`` file as ``tokenizer.json`` with its configuration), and
``titans_compose_hf.py``, three import lines that point ``trust_remote_code`` loading at the installed titans_compose
(the directory holds no model code: loading needs titans_compose with its ``hf`` extra either way).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from titans_compose.hf.config import BYTES, MODEL_TYPE, TitansComposeConfig
from titans_compose.hf.modeling import TitansComposeForCausalLM
from titans_compose.hf.tokenizer import VOCAB, ByteTokenizer
from titans_compose.io import atomic_write
from titans_compose.manifest import sha256
from titans_compose.spec import LoadedSpec

REMOTE_MODULE = "titans_compose_hf"
REMOTE_CODE = '''"""The titans_compose model classes, from the installed package (pip install "titans_compose[hf]").

This file holds no model code: trust_remote_code=True imports it, and it imports titans_compose.hf.
"""

from titans_compose.hf import ByteTokenizer, TitansComposeConfig, TitansComposeForCausalLM

__all__ = ["ByteTokenizer", "TitansComposeConfig", "TitansComposeForCausalLM"]
'''
AUTO_MAP = {
    "AutoConfig": f"{REMOTE_MODULE}.TitansComposeConfig",
    "AutoModelForCausalLM": f"{REMOTE_MODULE}.TitansComposeForCausalLM",
}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": [f"{REMOTE_MODULE}.ByteTokenizer", None]}


class HFExportError(RuntimeError):
    """A model could not be exported in the Hugging Face format; the message names the path and why."""


def _is_run(path: Path) -> bool:
    """Whether ``path`` is a ``titans-compose train`` run directory (its settings and its build)."""
    return (path / "config.json").is_file() and (path / "build" / "manifest.json").is_file()


def _source_model(
    path: Path, overrides: Sequence[str], plugins: Sequence[str], seed: int, step: int | None
) -> tuple[torch.nn.Module, LoadedSpec, int]:
    """The module, its spec and its seed of a spec file, a build, an exported artifact or a training run (the
    weights of its newest checkpoint, or of ``step``'s)."""
    from titans_compose.builder import build, load_build
    from titans_compose.manifest import read_manifest

    if step is not None and not _is_run(path):
        raise HFExportError(f"{path} is not a training run: --step picks one of a run's checkpoints")

    if not path.is_dir():
        built = build(path, overrides, plugins, seed=seed, smoke=False)
        return built.module, built.loaded, seed
    if overrides:
        raise HFExportError(f"{path} is a directory: --set applies to a spec, not to a fixed model")
    if _is_run(path):
        from titans_compose.train.checkpoint import CheckpointError, load_weights

        built = load_build(path / "build", plugins)
        try:
            load_weights(path / "checkpoints", built.module, step)
        except CheckpointError as exc:
            raise HFExportError(f"{path} is a training run without a usable checkpoint: {exc}") from None
        return built.module, built.loaded, built.report.seed
    from titans_compose.export import FORMAT as ARTIFACT

    manifest = read_manifest(path, ARTIFACT)
    if manifest is not None:
        from titans_compose.builder import SPEC_FILE
        from titans_compose.export import load
        from titans_compose.registry import default_registry
        from titans_compose.spec import load_spec

        module = load(path, plugins)  # verified: every file against the manifest
        loaded = load_spec(path / SPEC_FILE, registry=default_registry(plugins)[0])
        return module, loaded, manifest["seed"]
    built = load_build(path, plugins)
    return built.module, built.loaded, built.report.seed


def _check_output(out: Path, source: Path) -> None:
    """Refuse a file, the source itself, or a non-empty directory that is not an earlier export of this kind."""
    if out.exists() and not out.is_dir():
        raise HFExportError(f"{out} exists and is not a directory")
    if out.resolve() == source.resolve():
        raise HFExportError(f"{out} is the source itself: choose another output directory")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = json.loads((out / "config.json").read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise HFExportError(
                f"{out} is not empty and holds no titans_compose Hugging Face export: not writing there"
            )


def _save_tokenizer(staging: Path, tokenizer: str | os.PathLike[str] | None, vocab_size: int) -> dict[str, str]:
    """Write the tokeniser's files into ``staging`` and return how the configuration names it: the byte tokeniser
    (``tokenizer`` None; see :func:`save_hf` for its vocabulary check), or the ``tokenizers`` JSON file
    ``tokenizer`` as ``tokenizer.json``."""
    if tokenizer is None:
        byte_tokenizer = ByteTokenizer()
        byte_tokenizer.init_kwargs["auto_map"] = TOKENIZER_AUTO_MAP
        byte_tokenizer.save_pretrained(staging)
        return dict(BYTES)
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = Path(tokenizer)
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own untyped exception for any unreadable file
        raise HFExportError(f"{path} is not a tokenizers JSON file ({exc})") from None
    size = backend.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise HFExportError(f"{path} has {size} tokens, more than the model's vocabulary of {vocab_size}")
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(staging)
    return {"kind": "tokenizers", "file": "tokenizer.json", "sha256": sha256((staging / "tokenizer.json").read_bytes())}


def save_hf(
    module: torch.nn.Module,
    loaded: LoadedSpec,
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    plugins: Sequence[str] = (),
    tokenizer: str | os.PathLike[str] | None = None,
) -> TitansComposeForCausalLM:
    """Write ``module`` (a model of ``loaded``, its initial weights drawn with ``seed``) to ``out`` as a
    ``save_pretrained`` directory with its tokeniser (the byte tokeniser, or the ``tokenizers`` JSON file
    ``tokenizer``), and return the transformers model that was saved. Files are written atomically,
    ``config.json`` last."""
    from titans_compose.builder import plugin_records

    target = Path(out)
    vocab_size = loaded.spec.model.vocab_size
    if tokenizer is None and vocab_size < VOCAB:
        raise HFExportError(
            f"the model's vocabulary has {vocab_size} tokens, fewer than the {VOCAB} bytes of the byte tokeniser: "
            "pass the tokenizers file it was trained with (--tokenizer FILE)"
        )
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".hf-export-", dir=target))
    try:
        named = _save_tokenizer(staging, tokenizer, vocab_size)
        records = plugin_records(plugins, loaded.registry)
        config = TitansComposeConfig.from_loaded(loaded, seed=seed, plugin_records=records, tokenizer=named)
        config.auto_map = AUTO_MAP
        model = TitansComposeForCausalLM(config, plugins)
        model.model.load_state_dict(module.state_dict(), strict=True)
        model.save_pretrained(staging)
        (staging / f"{REMOTE_MODULE}.py").write_text(REMOTE_CODE, encoding="utf-8")
        names = sorted(p.name for p in staging.iterdir() if p.is_file())
        for name in [n for n in names if n != "config.json"] + ["config.json"]:
            atomic_write(target / name, (staging / name).read_bytes())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model


def export_hf(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overrides: Sequence[str] = (),
    plugins: Sequence[str] = (),
    seed: int = 0,
    step: int | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> TitansComposeForCausalLM:
    """Export ``source`` (a spec with ``overrides`` and ``seed``: its initial weights; a build: its weights; an
    exported artifact; or a ``train`` run: its newest checkpoint's weights, or ``step``'s) to ``out``. See
    :func:`save_hf`."""
    path, target = Path(source), Path(out)
    _check_output(target, path)
    module, loaded, seed = _source_model(path, overrides, plugins, seed, step)
    return save_hf(module, loaded, target, seed=seed, plugins=plugins, tokenizer=tokenizer)
