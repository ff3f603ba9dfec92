"""titans-compose export: artifacts reload in a fresh process and train, tampering and other releases are refused,
and the torch.export program gives the module's logits without any pickle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import ROOT, SPECS
from titans_compose.builder import build
from titans_compose.cli.main import cli
from titans_compose.export import ExportError, export_module, load, load_program

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.dim=32", "memory.heads=1", "memory.head_dim=16", "memory.expansion=2", "blocks.0.repeat=1"]
SPEC = SPECS / "titans_lmm_small.yaml"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny LMM, trained one step so its weights are not the initial ones, exported with its program."""
    built = build(SPEC, TINY, seed=3, smoke=False)
    model = built.module
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    tokens = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(tokens).logits.square().mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    out = tmp_path_factory.mktemp("artifact") / "tiny"
    done = export_module(model, built.loaded, out, seed=3, torch_export=True, example=(2, 16))
    return out, model, done


@pytest.mark.slow
def test_an_artifact_reloads_in_a_fresh_process_and_trains(artifact):
    out, model, _ = artifact
    script = textwrap.dedent(
        f"""
        import torch, titans_compose
        model = titans_compose.load({str(out)!r})
        assert type(model).__module__.startswith("titans_compose.nn") and isinstance(model, torch.nn.Module)
        tokens = torch.randint(256, (4, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            checksum = float(model(tokens).logits.double().sum())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        def loss():
            logits = model(tokens).logits[:, :-1]
            return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
        before = loss()
        optimizer.zero_grad(); before.backward(); optimizer.step()
        print(checksum, float(before), float(loss()))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TITANS_COMPOSE_NO_ENTRY_POINTS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    checksum, before, after = map(float, done.stdout.split())
    assert after < before
    # the fresh process has the exported (trained) weights, not a fresh initialisation
    tokens = torch.randint(256, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert checksum == pytest.approx(float(model(tokens).logits.double().sum()), rel=1e-9)


@pytest.mark.slow
def test_a_loaded_model_runs_under_torch_compile(artifact):
    out, _, _ = artifact
    model = load(out)
    tokens = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(tokens).logits, model(tokens).logits, atol=1e-5, rtol=0)


def test_the_manifest_records_hashes_versions_and_kernels(artifact):
    out, _, done = artifact
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "titans-compose-artifact"
    # the LMM's one memory layer (retrieval after) has a generated kernel: its source is in the artifact, hashed
    (kernel,) = manifest["kernels"]
    assert kernel.startswith("kernels/d2_silu_l2_b16_float32-") and kernel.endswith(".py")
    assert "@triton.jit" in (out / kernel).read_text()
    assert set(manifest["files"]) == {"spec.resolved.yaml", "weights.safetensors", "program.pt2", kernel}
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["versions"]["titans_compose"]
    assert manifest["program"]["tokens"] == 16 and done.program_max_diff <= 1e-5


@pytest.mark.parametrize("name", ["weights.safetensors", "spec.resolved.yaml", "program.pt2"])
def test_a_corrupted_artifact_is_refused_naming_the_file(artifact, tmp_path, name):
    out, _, _ = artifact
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 1
    (copy / name).write_bytes(bytes(data))
    loader = load_program if name == "program.pt2" else load
    with pytest.raises(ExportError, match=f"{copy / name} does not match its sha256"):
        loader(copy)
    (copy / name).unlink()
    with pytest.raises(ExportError, match=f"{copy / name} is missing"):
        loader(copy)


def test_another_release_or_format_is_refused(artifact, tmp_path):
    out, _, _ = artifact
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "versions": {"titans_compose": "9.9.0"}}))
    with pytest.raises(ExportError, match=r"manifest\.json: the artifact was written by titans_compose 9\.9\.0"):
        load(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 7}))
    with pytest.raises(ExportError, match="exported artifact format version 7"):
        load(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "versions": {**manifest["versions"], "torch": "1.0"}}))
    with pytest.raises(ExportError, match=r"program\.pt2 was saved by torch 1\.0"):
        load_program(copy)
    with pytest.raises(ExportError, match="is not a titans-compose exported artifact"):
        load(tmp_path)


def test_the_program_gives_the_modules_logits_and_unpickles_nothing(artifact, monkeypatch):
    out, model, _ = artifact
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    program = load_program(out)
    tokens = torch.randint(256, (3, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(program.module()(tokens), model(tokens).logits, atol=1e-5, rtol=0)


def test_export_cli_from_a_build_and_refusals(tmp_path, runner):
    build_dir = tmp_path / "build"
    built = build(SPEC, TINY, output_dir=build_dir, seed=4, smoke=False)
    out = tmp_path / "art"
    result = runner.invoke(cli, ["export", str(build_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 generated kernel source;" in result.output
    tokens = torch.randint(256, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load(out)(tokens).logits, built.module(tokens).logits)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 4
    again = runner.invoke(cli, ["export", str(build_dir), "-o", str(build_dir)])
    assert again.exit_code == 1 and "holds no manifest.json of a titans-compose exported artifact" in again.output
    bad = runner.invoke(cli, ["export", str(build_dir), "-o", str(out), "--set", "memory.depth=1"])
    assert bad.exit_code == 1 and "--set applies to a spec" in bad.output
