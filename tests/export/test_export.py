"""titans-compose export: artifacts reload in a fresh process and train, tampering and other releases are refused,
and the torch.export program gives the module's logits without any pickle."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import PLUGIN, REMOVED, ROOT, SPECS, WRONG_TYPES, refusals
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


def copy_of(artifact, tmp_path):
    out, _, _ = artifact
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy


def rehash(directory, name):
    """Record ``name``'s present contents in the manifest, as someone forging an artifact would."""
    manifest = json.loads((directory / "manifest.json").read_text())
    data = (directory / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_an_edited_kernel_source_or_an_unlisted_file_is_refused(artifact, tmp_path):
    copy = copy_of(artifact, tmp_path)
    (kernel,) = json.loads((copy / "manifest.json").read_text())["kernels"]
    with open(copy / kernel, "a") as handle:
        handle.write("\nimport os  # planted\n")
    with pytest.raises(ExportError, match=f"{copy / kernel} does not match its sha256"):
        load(copy)
    shutil.rmtree(copy)
    copy = copy_of(artifact, tmp_path)
    (copy / "kernels" / "extra.py").write_text("x = 1\n")
    (copy / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"holds kernels/extra\.py, notes\.txt, which manifest\.json does not list"):
        load(copy)


MARKER_PLUGIN = """
import os
from pathlib import Path
Path(os.environ["MARKER"]).write_text("imported")

def register(registry):
    pass
"""


def test_loading_imports_no_plugin_the_manifest_names(artifact, tmp_path, monkeypatch):
    _, model, _ = artifact
    plugin, marker = tmp_path / "marker_plugin.py", tmp_path / "marker"
    plugin.write_text(MARKER_PLUGIN)
    monkeypatch.setenv("MARKER", str(marker))
    built = build(SPEC, TINY, seed=3, smoke=False)
    export_module(model, built.loaded, tmp_path / "art", plugins=[str(plugin)])
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    digest = hashlib.sha256(MARKER_PLUGIN.encode()).hexdigest()
    assert manifest["plugins"] == [{"kind": "file", "name": "marker_plugin.py", "sha256": digest}]
    with pytest.raises(ExportError, match=r"made with the plug-in file marker_plugin\.py .* which was not passed"):
        load(tmp_path / "art")
    assert not marker.exists()  # refused before anything ran
    other = tmp_path / "other" / "marker_plugin.py"
    other.parent.mkdir()
    other.write_text(MARKER_PLUGIN + "# edited\n")
    with pytest.raises(ExportError, match=rf"\({other} given, but with other contents\)"):
        load(tmp_path / "art", plugins=[str(other)])
    assert not marker.exists()
    tokens = torch.randint(256, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # passed by the caller, the plug-in is imported and the model loads
        assert torch.equal(load(tmp_path / "art", plugins=[str(plugin)])(tokens).logits, model(tokens).logits)
    assert marker.read_text() == "imported"


@pytest.mark.parametrize("wrong", [REMOVED, *WRONG_TYPES.values()], ids=["removed", *WRONG_TYPES])
def test_a_malformed_manifest_is_refused_naming_it(artifact, tmp_path, wrong):
    copy = copy_of(artifact, tmp_path)
    loaded, messages = refusals(copy, load, ExportError, wrong)
    # a missing or unknown (None) torch, triton or Python version is informational for load (load_program checks
    # torch's), a float difference may be written as an integer, and the kernels list is informational too
    valid = {"versions.torch", "versions.triton", "versions.python", "program.max_abs_diff", "kernels.0", "program"}
    assert set(loaded) <= valid, loaded
    assert len(messages) >= 10  # every other field, at every depth
    _, messages = refusals(copy, load_program, ExportError, wrong)
    assert messages


def _header_length(data: bytes, length: int) -> bytes:
    return length.to_bytes(8, "little") + data[8:]


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:5],  # shorter than the 8-byte header length
        lambda data: data[: 8 + int.from_bytes(data[:8], "little") // 2],  # cut inside the JSON header
        lambda data: _header_length(data, len(data) * 4),  # a header longer than the file
        lambda data: _header_length(data, 1 << 62),  # an absurd header length
        lambda data: data[:8] + b"[" + data[9:],  # a header that is not a JSON object
        lambda data: data[: len(data) - 4],  # tensor data shorter than the header says
    ],
    ids=["truncated", "cut-header", "long-header", "huge-header", "not-json", "short-data"],
)
def test_damaged_weights_with_a_matching_hash_are_refused_naming_them(artifact, tmp_path, damage):
    copy = copy_of(artifact, tmp_path)
    weights = copy / "weights.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    rehash(copy, "weights.safetensors")
    with pytest.raises(ExportError, match=f"{weights} is not a readable safetensors file"):
        load(copy)


@pytest.mark.parametrize("name", ["manifest.json", "spec.resolved.yaml", "weights.safetensors"])
@pytest.mark.parametrize("kind", ["dev-zero", "pipe"])
def test_an_artifact_file_that_is_a_device_or_pipe_is_refused_without_reading_it(artifact, tmp_path, name, kind):
    copy = copy_of(artifact, tmp_path)
    (copy / name).unlink()
    if kind == "pipe":
        os.mkfifo(copy / name)  # nothing writes it: opening or reading it blindly would hang
    else:
        (copy / name).symlink_to("/dev/zero")  # endless, with st_size 0
    what = "a pipe" if kind == "pipe" else "a character device"
    with pytest.raises(ExportError, match=f"{copy / name} is {what}, not a regular file"):
        load(copy)


def test_export_cli_from_a_build_takes_its_plugins_only_from_the_command_line(tmp_path, runner):
    plugin = tmp_path / "cauchy_plugin.py"
    plugin.write_text(PLUGIN)
    build_dir, out = tmp_path / "build", tmp_path / "art"
    made = ["--plugin", str(plugin), "build", str(SPEC), "-o", str(build_dir), "--no-smoke"]
    assert runner.invoke(cli, [*made, *(f"--set={o}" for o in [*TINY, "update.loss=cauchy"])]).exit_code == 0
    refused = runner.invoke(cli, ["export", str(build_dir), "-o", str(out)])
    assert refused.exit_code == 1 and "made with the plug-in file cauchy_plugin.py" in refused.output
    assert "pass it yourself (--plugin FILE_OR_MODULE" in refused.output and not out.exists()
    done = runner.invoke(cli, ["export", str(build_dir), "-o", str(out), "--plugin", str(plugin)])
    assert done.exit_code == 0, done.output
    assert f"load it with: titans_compose.load({str(out)!r}, plugins={[str(plugin)]!r})" in done.output
    recorded = json.loads((out / "manifest.json").read_text())["plugins"]
    assert recorded == [{"kind": "file", "name": plugin.name, "sha256": hashlib.sha256(PLUGIN.encode()).hexdigest()}]
    assert load(out, plugins=[str(plugin)]).memory_configs()
