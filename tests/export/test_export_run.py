"""Exporting a training run: the artifact holds the trained weights of the run's newest checkpoint (or of --step),
and titans_compose.load gives the trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import SPECS
from titans_compose.builder import load_build
from titans_compose.cli.main import cli
from titans_compose.export import load
from titans_compose.train.checkpoint import load_weights

pytestmark = pytest.mark.usefixtures("one_thread")

NARROW = ["model.dim=32", "memory.head_dim=16", "memory.heads=1", "attention.heads=2", "blocks.0.repeat=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MAC run of 4 steps with checkpoints at steps 2 and 4."""
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("run") / "run"
    sets = [arg for item in NARROW for arg in ("--set", item)]
    small = ["--seq-len", "32", "--batch", "2", "--max-mb", "0.2", "--no-progress", "--eval-batches", "1"]
    args = ["train", str(SPECS / "titans_mac_small.yaml"), "-o", str(out), "--steps", "4", "--eval-every", "2"]
    result = CliRunner().invoke(cli, [*args, "--lr", "0.01", *small, *sets])
    assert result.exit_code == 0, result.output
    return out


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.randint(256, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.eval()(tokens).logits


def checkpointed(run: Path, step: int | None = None) -> torch.nn.Module:
    """The run's model restored from its checkpoint the way training restores it."""
    module = load_build(run / "build").module
    load_weights(run / "checkpoints", module, step)
    return module


def test_an_exported_run_loads_as_the_trained_model(run_dir: Path, runner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["export", str(run_dir), "-o", str(tmp_path / "art")])
    assert result.exit_code == 0, result.output
    assert "trained weights of step 4" in result.output
    exported = logits_of(load(tmp_path / "art"))
    assert torch.equal(exported, logits_of(checkpointed(run_dir)))
    assert not torch.allclose(exported, logits_of(load_build(run_dir / "build").module))  # not the initial weights
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    record = json.loads((run_dir / "checkpoints" / "step-00000004.json").read_text())
    assert manifest["trained"] == {"step": 4, "checkpoint_sha256": record["tensors"]["sha256"]}


def test_an_earlier_step_is_exported_and_a_missing_one_refused(run_dir: Path, runner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["export", str(run_dir), "-o", str(tmp_path / "art2"), "--step", "2"])
    assert result.exit_code == 0, result.output
    exported = logits_of(load(tmp_path / "art2"))
    assert torch.equal(exported, logits_of(checkpointed(run_dir, 2)))
    assert not torch.equal(exported, logits_of(checkpointed(run_dir, 4)))
    missing = runner.invoke(cli, ["export", str(run_dir), "-o", str(tmp_path / "art3"), "--step", "3"])
    assert missing.exit_code == 1 and "no checkpoint of step 3" in missing.output and "kept: 2, 4" in missing.output
    assert not (tmp_path / "art3").exists()


def test_run_refusals_name_the_problem(run_dir: Path, runner, tmp_path: Path) -> None:
    with_set = runner.invoke(cli, ["export", str(run_dir), "-o", str(tmp_path / "a"), "--set", "memory.depth=1"])
    assert with_set.exit_code == 1 and "is a training run: --set applies to a spec" in with_set.output
    spec_step = runner.invoke(
        cli, ["export", str(SPECS / "titans_mac_small.yaml"), "-o", str(tmp_path / "b"), "--step", "2"]
    )
    assert spec_step.exit_code == 1 and "is not a training run" in spec_step.output
    (tmp_path / "empty" / "build").mkdir(parents=True)
    (tmp_path / "empty" / "checkpoints").mkdir()
    no_run = runner.invoke(cli, ["export", str(tmp_path / "empty"), "-o", str(tmp_path / "c")])
    assert no_run.exit_code == 1 and "manifest.json" in no_run.output
