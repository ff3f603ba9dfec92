"""Exporting a model to train it elsewhere: a self-contained, verifiable artifact directory and its loader.

An artifact holds ``spec.resolved.yaml`` (every default written out), ``weights.safetensors`` (the module's current
weights) and, written last, ``manifest.json`` with the format version, the versions of titans_compose, torch, triton
and Python that wrote it, the generated Triton kernel sources its memory layers run on a GPU (under ``kernels/``, for
reading and auditing: a loader regenerates or takes them from its own cache) and the sha256 of every file. With
``torch_export`` it also holds ``program.pt2``: a
:class:`torch.export.ExportedProgram` of the forward pass (tokens [B, T] -> logits, batch size dynamic, T fixed at
export) on the chunked PyTorch path, checked at export to give the module's outputs.

:func:`load` verifies that the directory holds exactly the files the manifest lists, every hash and the versions,
rebuilds the module from the spec and loads the weights: no pickle is involved, and no code runs that the caller
did not pass (a plug-in the manifest names must be given to :func:`load`). ``program.pt2`` is torch.export's
archive: the graph as JSON, plain tensors as raw bytes, and any sample inputs or tensor subclasses pickled; the
artifact saves no sample inputs and the model has no tensor subclasses, and :func:`load_program` refuses an
archive that would need unpickling.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from titans_compose.builder import (
    SPEC_FILE,
    WEIGHTS_FILE,
    ModelHeader,
    build,
    check_plugins,
    load_build,
    plugin_records,
    restore,
    safetensors_bytes,
    spec_hash,
    spec_name,
)
from titans_compose.manifest import (
    MANIFEST,
    check_output_dir,
    package_version,
    read_verified,
    versions,
)
from titans_compose.manifest import write_with_manifest as write_files
from titans_compose.spec import LoadedSpec

FORMAT = "titans-compose-artifact"
#: 2: plug-ins recorded as kind, name and sha256 (version 1 recorded absolute paths)
FORMAT_VERSION = 2
PROGRAM_FILE = "program.pt2"
WHAT = "exported artifact"
REMEDY = "export the model again with this titans-compose"
#: the default example batch the program is traced with: [batch, tokens]
EXAMPLE_SHAPE = (2, 64)


class ExportError(RuntimeError):
    """An artifact could not be written or loaded; the message names the file and says why."""


class ArtifactHeader(ModelHeader):
    """An artifact's manifest: a model's, plus its kernel sources and its program (None without one)."""

    class Program(BaseModel):
        model_config = ConfigDict(strict=True, extra="allow")
        file: str
        input: str
        tokens: int
        output: str
        max_abs_diff: float

    kernels: list[str]
    program: Program | None


@dataclass
class Exported:
    """What :func:`export_module` wrote: the directory, its manifest, and (with a program) the largest absolute
    difference between the program's and the module's logits on the check batches."""

    path: Path
    manifest: dict[str, Any]
    program_max_diff: float | None = None


class Logits(torch.nn.Module):
    """``model(tokens).logits``: the forward pass as a function of tensors only, which torch.export needs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens).logits


def kernel_sources(module: torch.nn.Module) -> dict[str, bytes]:
    """The generated kernel sources ``module``'s memory layers run on a CUDA device with float32 inputs (the
    artifact's dtype), by cache file name; a layer whose configuration has no generated kernel adds none."""
    from titans_compose.ops.memory.codegen import cache, emit
    from titans_compose.ops.memory.codegen.key import kernel_key
    from titans_compose.ops.memory.codegen.support import unsupported_reason

    configs = module.memory_configs() if hasattr(module, "memory_configs") else []
    keys = {kernel_key(cfg, "float32") for cfg in configs if unsupported_reason(cfg, "float32") is None}
    return {cache.source_path(key).name: emit.generate(key).encode("utf-8") for key in keys}


def _major_minor(text: str | None) -> tuple[str, ...]:
    return tuple((text or "").split("+")[0].split(".")[:2])


def _program(module: torch.nn.Module, example: tuple[int, int], vocab: int) -> tuple[bytes, float]:
    """``program.pt2`` of ``module``'s forward, traced on ``example`` tokens with a dynamic batch size, and the
    largest difference from the module's logits, checked on the program as saved (reloaded from its bytes) at two
    batch sizes. Raises :class:`ExportError` if the outputs differ."""
    wrapper = Logits(module).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(vocab, (b, example[1]), generator=gen) for b in (example[0], example[0] + 1)]
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.export.export(wrapper, (batches[0],), dynamic_shapes={"tokens": {0: batch}})
        program.example_inputs = None  # sample inputs would be saved with pickle
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        data = buffer.getvalue()
        reloaded = torch.export.load(io.BytesIO(data)).module()
        diff = max(float((reloaded(t) - wrapper(t)).abs().max()) for t in batches)
    if diff > 1e-5:
        raise ExportError(
            f"the exported program's logits differ from the module's by up to {diff:.3g}: not writing {PROGRAM_FILE}"
        )
    return data, diff


def export_module(
    module: torch.nn.Module,
    loaded: LoadedSpec,
    out: str | os.PathLike[str],
    *,
    plugins: Sequence[str] = (),
    seed: int = 0,
    torch_export: bool = False,
    example: tuple[int, int] = EXAMPLE_SHAPE,
    trained: dict[str, Any] | None = None,
) -> Exported:
    """Write ``module`` (a model of ``loaded``, e.g. after training) as an artifact in ``out`` (new, empty, or an
    earlier artifact). ``plugins`` are the ``--plugin`` targets the spec was loaded with (recorded with the
    entry-point plug-ins that registered something; see :func:`~titans_compose.builder.plugin_records`); with
    ``torch_export`` the forward is also exported (traced with ``example`` = (batch, tokens) and checked against
    the module). ``trained`` (e.g. the step and checkpoint hash of a training run) is recorded in the manifest."""
    target = Path(out)
    check_output_dir(target, FORMAT, WHAT, ExportError, (SPEC_FILE, WEIGHTS_FILE, PROGRAM_FILE, MANIFEST))
    module = module.cpu()
    weights = {name: t.detach().clone().contiguous() for name, t in module.state_dict().items()}
    files = {
        SPEC_FILE: loaded.resolved_yaml().encode("utf-8"),
        WEIGHTS_FILE: safetensors_bytes(weights, metadata={"format": FORMAT}),
    }
    kernels = kernel_sources(module)
    files.update({f"kernels/{name}": source for name, source in kernels.items()})
    header: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": spec_name(loaded),
        "spec_sha256": spec_hash(loaded),
        "seed": seed,
        "plugins": plugin_records(plugins, loaded.registry),
        "versions": versions(),
        "kernels": sorted(f"kernels/{name}" for name in kernels),
        "program": None,
        **({"trained": trained} if trained is not None else {}),
    }
    diff = None
    if torch_export:
        files[PROGRAM_FILE], diff = _program(module, example, loaded.spec.model.vocab_size)
        header["program"] = {
            "file": PROGRAM_FILE,
            "input": "tokens: int64 [batch, tokens], batch dynamic",
            "tokens": example[1],
            "output": "logits: [batch, tokens, vocab_size]",
            "max_abs_diff": diff,
        }
    write_files(target, files, header)
    return Exported(target, {**header, "files": sorted(files)}, diff)


def is_run(path: Path) -> bool:
    """Whether ``path`` is a ``titans-compose train`` run directory (a ``build/`` and a ``checkpoints/`` folder)."""
    return (path / "build").is_dir() and (path / "checkpoints").is_dir()


def trained_model(run: Path, plugins: Sequence[str] = (), step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The run's model (its build, verified) with the weights of its newest checkpoint or of the one of ``step``,
    and what to record of that checkpoint: its step and the sha256 of its tensor file."""
    from titans_compose.train.checkpoint import CheckpointError, load_weights

    built = load_build(run / "build", plugins)
    try:
        record = load_weights(run / "checkpoints", built.module, step)
    except CheckpointError as exc:
        raise ExportError(f"cannot export the run in {run}: {exc}") from None
    return built, {"step": record["step"], "checkpoint_sha256": record["tensors"]["sha256"]}


def export(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overrides: Sequence[str] = (),
    plugins: Sequence[str] = (),
    seed: int = 0,
    torch_export: bool = False,
    example: tuple[int, int] = EXAMPLE_SHAPE,
    step: int | None = None,
) -> Exported:
    """Export ``source``: a training run's directory (its build's spec with the weights of its newest checkpoint,
    or of the checkpoint of ``step``), a build directory (verified; its weights) or a spec (built with ``overrides``
    and ``seed``; its initial weights). See :func:`export_module`."""
    path = Path(source)
    if step is not None and not is_run(path):
        raise ExportError(f"{path} is not a training run (no build/ and checkpoints/): --step picks a run's checkpoint")
    if is_run(path):
        if overrides:
            raise ExportError(f"{path} is a training run: --set applies to a spec, not to a trained model")
        built, trained = trained_model(path, plugins, step)
        return export_module(
            built.module,
            built.loaded,
            out,
            plugins=plugins,
            seed=built.report.seed,
            torch_export=torch_export,
            example=example,
            trained=trained,
        )
    if path.is_dir():
        if overrides:
            raise ExportError(f"{path} is a build: --set applies to a spec, not to a build's fixed model")
        built = load_build(path, plugins)  # verified; refused unless plugins has the build's plug-ins
        seed = built.report.seed
    else:
        built = build(path, overrides, plugins, seed=seed, smoke=False)
    return export_module(
        built.module, built.loaded, out, plugins=plugins, seed=seed, torch_export=torch_export, example=example
    )


def _verify(path: str | os.PathLike[str], names: list[str]) -> tuple[Path, dict[str, Any], dict[str, bytes]]:
    """The artifact's manifest and the bytes of every file, verified, ``names`` and the kernels and program the
    manifest names among them; refuses another titans_compose release."""
    root = Path(path)
    manifest, data = read_verified(
        root, ArtifactHeader, FORMAT, FORMAT_VERSION, names, what=WHAT, remedy=REMEDY, error=ExportError
    )
    named = [*manifest["kernels"], *([manifest["program"]["file"]] if manifest["program"] else [])]
    for name in named:
        if name not in data:
            raise ExportError(f"{root / MANIFEST} names {name} but does not list it among the files: {REMEDY}")
    made = manifest.get("versions", {}).get("titans_compose")
    running = package_version("titans_compose")
    if _major_minor(made) != _major_minor(running):
        raise ExportError(
            f"{root / MANIFEST}: the artifact was written by titans_compose {made}, this is {running}: the spec "
            f"language and the modules may differ between releases; {REMEDY}"
        )
    return root, manifest, data


def load(path: str | os.PathLike[str], plugins: Sequence[str] = ()) -> torch.nn.Module:
    """The model of the artifact in ``path`` as a plain ``nn.Module`` (``model(tokens).logits``), with its weights,
    for any training loop or ``torch.compile``. Every file in the directory is checked against the manifest (a
    changed, missing or unlisted file, a malformed manifest, another format version or another titans_compose
    release is refused with an :class:`ExportError` naming the file). ``plugins`` must include every plug-in file
    or module the artifact was exported with: none is imported on the manifest's word, and a missing one is
    refused, naming it, before anything is imported."""
    root, manifest, data = _verify(path, [SPEC_FILE, WEIGHTS_FILE])
    check_plugins(root, manifest, plugins, WHAT, ExportError)
    module, _, _ = restore(root, manifest, data[WEIGHTS_FILE], plugins, REMEDY, ExportError)
    return module


def _check_no_pickle(archive: bytes, where: Path) -> None:
    """Refuse a torch.export archive that holds pickled payloads (sample inputs, tensor subclasses)."""
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as z:
            names = z.namelist()
            sample = [n for n in names if "/sample_inputs/" in n]
            configs = [n for n in names if n.endswith(("_weights_config.json", "_constants_config.json"))]
            pickled = [n for n in sample if z.getinfo(n).file_size]
            for name in configs:
                entries = json.loads(z.read(name)).get("config", {})
                pickled += [f"{name}: {k}" for k, v in entries.items() if not isinstance(v, dict) or v["use_pickle"]]
    except (zipfile.BadZipFile, ValueError, KeyError) as exc:
        raise ExportError(f"{where} is not a torch.export archive this titans-compose can check: {exc}") from None
    if not configs:
        raise ExportError(f"{where} has no weights index this titans-compose can check: {REMEDY}")
    if pickled:
        raise ExportError(f"{where} holds pickled data ({', '.join(pickled[:3])}): refusing to load it")


def load_program(path: str | os.PathLike[str]) -> torch.export.ExportedProgram:
    """The ``program.pt2`` of an artifact exported with ``torch_export``, after the same checks as :func:`load`,
    a check that this torch is the release that wrote it, and a check that loading it unpickles nothing."""
    root, manifest, data = _verify(path, [PROGRAM_FILE])
    made = manifest.get("versions", {}).get("torch")
    if _major_minor(made) != _major_minor(torch.__version__):
        raise ExportError(
            f"{root / PROGRAM_FILE} was saved by torch {made}, this is torch {torch.__version__}: torch.export "
            f"archives are read by the release that wrote them; load the artifact with titans_compose.load, or {REMEDY}"
        )
    _check_no_pickle(data[PROGRAM_FILE], root / PROGRAM_FILE)
    return torch.export.load(io.BytesIO(data[PROGRAM_FILE]))
