"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint of step ``s`` is two files in the checkpoint directory, ``step-<s>.safetensors`` (the model's
``model/<name>`` tensors, the optimizer's per-parameter ``optimizer/<index>/<key>`` tensors and the random number
generators' ``rng/<device>`` states) and ``step-<s>.json`` (the optimizer's parameter groups and non-tensor state,
the caller's training state, and the sha256 of the tensor file). ``latest.json``, written last, names the newest
one, so a crash while writing leaves the previous checkpoint in force. Every file is written atomically;
:func:`remove_interrupted` clears what a killed writer leaves behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors

from titans_compose.io import atomic_write, temporaries
from titans_compose.nn.legacy_keys import has_legacy_keys
from titans_compose.train.distributed import full_tensor, like

FORMAT = "titans-compose-checkpoint"
FORMAT_VERSION = 1
LATEST = "latest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit the model; the message names the file."""


def _name(step: int) -> str:
    return f"step-{step:08d}"


def _rng_tensors() -> dict[str, torch.Tensor]:
    states = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
    write: bool = True,
) -> Path:
    """Write a checkpoint of ``model``, ``optimizer``, the RNG states and the JSON-serialisable ``state`` at ``step``.

    Returns the JSON file's path. Only the newest ``keep`` (at least 1) checkpoints are kept: older ones are
    deleted once the new one is in force. Weights and optimizer state sharded over ranks (FSDP2's ``DTensor``) are
    gathered whole, so the file is the same for any number of ranks: every rank must call this, and only the one
    with ``write`` writes.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    from titans_compose.builder import safetensors_bytes

    root = Path(directory)
    tensors = {f"model/{k}": full_tensor(v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    # in a fixed order: with sharded state every rank gathers each tensor at the same time
    for index, entry in sorted(optim["state"].items()):
        for key, value in sorted(entry.items()):
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = full_tensor(value).detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors.update(_rng_tensors())
    name = _name(step)
    if not write:
        return root / f"{name}.json"
    data = safetensors_bytes(tensors, metadata={"format": FORMAT, "step": str(step)})
    atomic_write(root / f"{name}.safetensors", data)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "tensors": {"file": f"{name}.safetensors", "sha256": hashlib.sha256(data).hexdigest()},
        "optimizer": {"param_groups": optim["param_groups"], "state": scalars},
        "state": state,
    }
    atomic_write(root / f"{name}.json", json.dumps(record, indent=1) + "\n")
    atomic_write(root / LATEST, json.dumps({"format": FORMAT, "checkpoint": f"{name}.json"}) + "\n")
    for old in sorted(root.glob("step-*.json"))[:-keep]:
        old.with_suffix(".safetensors").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return root / f"{name}.json"


def remove_interrupted(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete what a run killed while checkpointing left in ``directory`` and return it: atomic-write temporaries
    and step files newer than the checkpoint ``latest.json`` names (written, never put in force). Only for the
    holder of the run's lock: another writer's temporaries would look the same."""
    root = Path(directory)
    if not root.is_dir():
        return []
    removed = temporaries(root)
    newest: str | None = ""  # without latest.json no checkpoint is in force: every step file is uncommitted
    if (root / LATEST).exists():
        try:
            newest = Path(str(_read_json(root / LATEST).get("checkpoint"))).stem
        except CheckpointError:
            newest = None  # a damaged pointer: keep the step files, read_checkpoint names the problem
    if newest is not None:
        removed += sorted(p for p in root.glob("step-*") if p.name.split(".")[0] > newest)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}): the checkpoint is corrupted") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a titans-compose checkpoint file")
    return data


def checkpoint_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The steps of the checkpoints in ``directory`` (their JSON records), in order."""
    return sorted(int(p.stem.removeprefix("step-")) for p in Path(directory).glob("step-*.json"))


def read_checkpoint(
    directory: str | os.PathLike[str], step: int | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The newest checkpoint in ``directory`` (or the one of ``step``): its JSON record and its tensors, verified
    against the recorded sha256.

    Raises :class:`CheckpointError` if there is none or it is incomplete, corrupted or of another format version.
    """
    root = Path(directory)
    if step is not None:
        name = f"{_name(step)}.json"
        if not (root / name).is_file():
            kept = ", ".join(map(str, checkpoint_steps(root))) or "none"
            raise CheckpointError(f"no checkpoint of step {step} in {root} (the steps kept: {kept})")
    elif not (root / LATEST).is_file():
        raise CheckpointError(f"no checkpoint in {root} (no {LATEST}): nothing to resume from")
    else:
        name = str(_read_json(root / LATEST).get("checkpoint"))
    record = _read_json(root / name)
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{root / name}: checkpoint format version {record.get('format_version')!r}, "
            f"this titans-compose reads version {FORMAT_VERSION}"
        )
    tensor_path = root / record["tensors"]["file"]
    try:
        data = tensor_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{tensor_path} is missing: the checkpoint is incomplete") from None
    if hashlib.sha256(data).hexdigest() != record["tensors"]["sha256"]:
        raise CheckpointError(f"{tensor_path} does not match its sha256: the checkpoint is corrupted")
    return record, load_tensors(data)


def _like(saved: Any, current: Any) -> Any:
    """JSON turns tuples (e.g. Adam's betas) into lists; give them back the type the optimizer uses."""
    return tuple(saved) if isinstance(current, tuple) and isinstance(saved, list) else saved


def _restore_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    current = model.state_dict()
    weights = {}
    for key, value in tensors.items():
        if key.startswith("model/"):
            name = key.removeprefix("model/")
            weights[name] = like(value, current.get(name))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{where} does not fit the model: {exc}") from None


def load_weights(directory: str | os.PathLike[str], model: torch.nn.Module, step: int | None = None) -> dict[str, Any]:
    """Load only the model's weights from the newest checkpoint in ``directory`` (or the one of ``step``), to use
    the trained model; returns the checkpoint's JSON record."""
    record, tensors = read_checkpoint(directory, step)
    _restore_model(model, tensors, Path(directory) / record["tensors"]["file"])
    return record


def load_checkpoint(
    directory: str | os.PathLike[str], *, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore ``model``, ``optimizer`` and the RNG states from the newest checkpoint; return its ``state`` and
    ``step`` (as ``{"step": ..., **state}``). Weights and optimizer state are sharded like the model's own when it is
    sharded over ranks (FSDP2), whatever number of ranks wrote the checkpoint: every rank must call this."""
    record, tensors = read_checkpoint(directory)
    where = Path(directory) / record["tensors"]["file"]
    if has_legacy_keys({k.removeprefix("model/") for k in tensors if k.startswith("model/")}):
        raise CheckpointError(
            f"{where} was written before each memory layer became one module: its weights load (export the run, or "
            "use load_weights), but its optimizer state is ordered by the old modules and cannot be restored; start "
            "a new run from the exported weights"
        )
    _restore_model(model, tensors, where)
    state: dict[int, dict[str, Any]] = {
        int(index): dict(values) for index, values in record["optimizer"]["state"].items()
    }
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, value in sorted(tensors.items()):  # safetensors' own order differs from process to process
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            shaped = like(value, params[int(index)]) if int(index) < len(params) else value
            state.setdefault(int(index), {})[name] = shaped
    current = optimizer.state_dict()["param_groups"]
    groups = record["optimizer"]["param_groups"]
    if len(groups) != len(current):
        raise CheckpointError(f"{where}: {len(groups)} optimizer parameter groups, the optimizer has {len(current)}")
    groups = [{k: _like(v, now.get(k)) for k, v in saved.items()} for saved, now in zip(groups, current, strict=True)]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{where} does not fit the optimizer: {exc}") from None
    torch.set_rng_state(tensors["rng/cpu"])
    cuda = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state for _, state in cuda])
    return {"step": record["step"], **record["state"]}
