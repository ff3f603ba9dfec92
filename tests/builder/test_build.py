"""Builds: the report, the build directory and its manifest, verification on load, and the `build` command."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import DIVERGING, PLUGIN, REMOVED, ROOT, SPECS, WRONG_TYPES, refusals, shipped_specs
from titans_compose import builder, manifest
from titans_compose.builder import BUILD_FILES, MANIFEST, BuildError, BuildReport, build, load_build
from titans_compose.cli.main import cli
from titans_compose.ops.memory.codegen.cache import cache_dir
from titans_compose.registry import reset_default_registry

MAC = SPECS / "titans_mac_small.yaml"


class StandIn(torch.nn.Module):
    """A tiny language model with the model's interface, so builds are tested without the real model's cost."""

    def __init__(self, graph, loaded):
        super().__init__()
        vocab, dim = loaded.spec.model.vocab_size, 8
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)
        self.memory_layers = [f"layers.{rec['index']}" for rec in graph.graph["layers"]]

    def forward(self, tokens):
        return SimpleNamespace(logits=self.head(self.embed(tokens)), state=None)

    def components(self):
        return [("embed", self.embed.weight.numel()), ("head", sum(p.numel() for p in self.head.parameters()))]

    def memory_backends(self):
        return [(layer, "chunked", "the stand-in's reason") for layer in self.memory_layers]


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(builder, "make_module", StandIn)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def timeless(report):
    """``report`` without the smoke check's time, the one field two identical builds may differ in."""
    return replace(report, smoke=replace(report.smoke, seconds=0.0))


def test_build_writes_every_file_and_a_manifest_of_their_hashes(stand_in, tmp_path):
    out = tmp_path / "b"
    result = build(MAC, output_dir=out, seed=3)
    assert sorted(p.name for p in out.iterdir()) == sorted([*BUILD_FILES, MANIFEST])  # no temporary files left
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == "titans-compose-build" and manifest["format_version"] == 2
    assert manifest["seed"] == 3 and manifest["spec"] == "titans-mac-small"
    assert manifest["spec_sha256"] == builder.spec_hash(result.loaded) == builder.spec_hash(load_build(out).loaded)
    assert set(manifest["versions"]) == {"titans_compose", "torch", "triton", "python"}
    assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == {
        name: sha256(out / name) for name in BUILD_FILES
    }
    assert BuildReport.from_json(json.loads((out / "report.json").read_text())) == result.report
    assert (out / "graph.mmd").read_text().startswith("flowchart TD")
    assert (out / "graph.dot").read_text().startswith("digraph")


def test_report(stand_in):
    report = build(MAC, seed=1).report
    assert report.spec_name == "titans-mac-small" and report.spec_source == str(MAC)
    assert report.parameters == [("embed", 256 * 8), ("head", 8 * 256 + 256)]
    assert report.total_parameters == 256 * 8 + 8 * 256 + 256
    (_, _, nodes), _ = report.layers
    assert report.layers == [(0, "mac", nodes), (1, "mac", nodes)] and report.graph_nodes > 2 * nodes > 10
    assert report.passes == ["acyclic", "reachability", "shape_inference", "wiring", "backend"]
    assert report.kernels == "kernels: none generated; the chunked PyTorch path for every memory layer"
    assert report.smoke.finite and report.smoke.loss > 0 and report.smoke.grad_norm > 0


def test_a_loaded_spec_builds_the_same_and_takes_no_overrides(stand_in):
    from titans_compose import load_spec

    from_loaded, from_path = build(load_spec(MAC), seed=1).report, build(MAC, seed=1).report
    assert timeless(from_loaded) == timeless(from_path)
    loaded = load_spec(MAC)
    with pytest.raises(ValueError, match="overrides apply when a spec is loaded"):
        build(loaded, ["memory.depth=3"])


def test_kernels_line_follows_the_backends():
    assert builder.kernels_line([]) == "kernels: none generated (the model has no memory layers)"
    mixed = builder.kernels_line([("layers.0", "chunked", ""), ("layers.1", "reference", "")])
    assert mixed == (
        "kernels: none generated; the chunked PyTorch path for layers.0; the reference PyTorch path for layers.1"
    )
    generated = builder.kernels_line([("L0", "triton", ""), ("L1", "triton", ""), ("L2", "auto", "")])
    assert generated == (
        f"kernels: generated Triton kernels for L0, L1 (sources in {cache_dir()}); "
        "chosen at the first forward pass for L2"
    )


def test_weights_depend_only_on_the_seed_and_the_smoke_check_leaves_them(stand_in):
    def weights(seed, smoke):
        return build(MAC, seed=seed, smoke=smoke).module.state_dict()

    a, b, c = weights(0, True), weights(0, False), weights(1, True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.weight"], c["embed.weight"])


def test_a_non_finite_smoke_check_is_an_error(stand_in, tmp_path):
    class Broken(StandIn):
        def forward(self, tokens):
            return SimpleNamespace(logits=super().forward(tokens).logits * float("nan"), state=None)

    builder.make_module = Broken  # undone by the stand_in fixture's monkeypatch
    with pytest.raises(BuildError, match="smoke check failed: loss nan"):
        build(MAC, output_dir=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_diverging_memory_fails_the_smoke_check_as_a_build_error(runner, tmp_path):
    """A memory whose inner update diverges on the smoke batch is the spec's problem: a BuildError naming the layer
    and the token, exit 1 on the command line (it was an internal error, exit 3)."""
    spec = str(SPECS / "titans_lmm_small.yaml")
    # a step large enough to overflow float32 within the 64-token smoke batch
    diverging = [*DIVERGING, "update.lr.max_lr=1000000", "update.lr.init=500000", "memory.chunk_size=1"]
    with pytest.raises(BuildError, match=r"smoke check failed: .*memory layer L0\.memory: the memory weights"):
        build(spec, diverging, output_dir=tmp_path / "b")
    assert not (tmp_path / "b").exists()
    overrides = [arg for o in diverging for arg in ("--set", o)]
    result = runner.invoke(cli, ["build", spec, *overrides, "-o", str(tmp_path / "c")])
    assert result.exit_code == 1, result.output
    assert "smoke check failed" in result.output and "Traceback" not in result.output


def test_load_build_gives_the_identical_model(stand_in, tmp_path):
    built = build(MAC, ["memory.depth=3"], output_dir=tmp_path / "b", seed=7)
    loaded = load_build(tmp_path / "b")
    assert loaded.report == built.report and loaded.loaded.spec.memory.depth == 3
    tokens = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(0))
    built.module.eval(), loaded.module.eval()
    with torch.no_grad():
        assert torch.equal(built.module(tokens).logits, loaded.module(tokens).logits)


@pytest.mark.parametrize("name", BUILD_FILES)
def test_a_changed_or_missing_file_is_refused_by_name(stand_in, tmp_path, name):
    changed, missing = tmp_path / "changed", tmp_path / "missing"
    for out in (changed, missing):
        build(MAC, output_dir=out, smoke=False)
    with open(changed / name, "ab") as handle:
        handle.write(b" ")
    with pytest.raises(BuildError, match=f"{name} does not match its sha256"):
        load_build(changed)
    (missing / name).unlink()
    with pytest.raises(BuildError, match=f"{name} is missing"):
        load_build(missing)


def test_an_unknown_format_or_no_manifest_is_refused(stand_in, tmp_path):
    out = tmp_path / "b"
    build(MAC, output_dir=out, smoke=False)
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(BuildError, match="format version 99"):
        load_build(out)
    (out / MANIFEST).unlink()
    with pytest.raises(BuildError, match="is not a titans-compose build"):
        load_build(out)


def test_a_spec_that_resolves_differently_is_refused(stand_in, tmp_path):
    out = tmp_path / "b"
    build(MAC, output_dir=out, smoke=False)
    spec = (out / "spec.resolved.yaml").read_text().replace("depth: 2", "depth: 3")
    (out / "spec.resolved.yaml").write_text(spec)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["spec.resolved.yaml"]["sha256"] = hashlib.sha256(spec.encode()).hexdigest()
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BuildError, match="no longer resolves to the spec that was built"):
        load_build(out)


def test_an_interrupted_rebuild_leaves_no_manifest(stand_in, tmp_path, monkeypatch):
    out = tmp_path / "b"
    build(MAC, output_dir=out, smoke=False)

    def fail(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(manifest, "atomic_write", fail)
    with pytest.raises(OSError, match="disk full"):
        build(MAC, output_dir=out, seed=1, smoke=False)
    with pytest.raises(BuildError, match="is not a titans-compose build"):
        load_build(out)


def test_output_conflicts_are_refused_and_the_spec_is_never_touched(stand_in, tmp_path):
    spec = tmp_path / "mine.yaml"
    spec.write_text(MAC.read_text())
    before = spec.read_bytes()
    with pytest.raises(BuildError, match="is a file, not a directory"):
        build(spec, output_dir=spec)
    with pytest.raises(BuildError, match=r"is not empty and holds no manifest\.json"):
        build(spec, output_dir=tmp_path)
    assert spec.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml"]
    out = tmp_path / "b"
    build(spec, output_dir=out, seed=0, smoke=False)
    build(spec, output_dir=out, seed=1, smoke=False)  # an earlier build may be replaced
    assert json.loads((out / MANIFEST).read_text())["seed"] == 1 and load_build(out).report.seed == 1
    with pytest.raises(BuildError, match="would overwrite the spec itself"):
        build(out / "spec.resolved.yaml", output_dir=out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match=r"also holds notes\.txt, which the build did not write"):
        build(spec, output_dir=out)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(BuildError, match=r"holds notes\.txt, which manifest\.json does not list"):
        load_build(out)  # every file of a build is listed and verified


def test_cli_prints_the_report_it_writes(stand_in, runner, tmp_path):
    out = tmp_path / "b"
    result = runner.invoke(cli, ["build", str(MAC), "-o", str(out), "--seed", "2", "--set", "memory.depth=3"])
    assert result.exit_code == 0, result.output
    report = load_build(out).report
    assert result.output == f"{report.summary()}\nwrote {out}/ (manifest.json lists every file with its sha256)\n"
    assert report.seed == 2 and "memory backends:\n  layers.0: chunked (the stand-in's reason)" in result.output
    assert "  total" in result.output and report.kernels in result.output and "smoke check: loss" in result.output


def test_the_api_reports_what_the_cli_printed(stand_in, runner, tmp_path):
    out = tmp_path / "b"
    assert runner.invoke(cli, ["build", str(MAC), "-o", str(out), "--seed", "4"]).exit_code == 0
    printed, api = load_build(out).report, build(MAC, seed=4).report
    assert timeless(api) == timeless(printed)


def test_cli_default_directory_and_no_smoke(stand_in, runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["build", str(MAC), "--no-smoke"])
    assert result.exit_code == 0, result.output
    assert "smoke check: skipped" in result.output and load_build(tmp_path / "build" / "titans-mac-small").report


def test_cli_graph_prints_the_mermaid_text(stand_in, runner, tmp_path):
    result = runner.invoke(cli, ["build", str(MAC), "-o", str(tmp_path / "b"), "--graph", "--no-smoke"])
    assert result.exit_code == 0, result.output
    mermaid = (tmp_path / "b" / "graph.mmd").read_text()
    assert f"graph nodes in all)\n{mermaid}" in result.output and " nodes\n" not in result.output


def test_load_build_takes_the_builds_plugins_only_from_its_caller(runner, tmp_path, monkeypatch):
    plugin, out = tmp_path / "cauchy_plugin.py", tmp_path / "b"
    plugin.write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    args = ["build", str(MAC), "-o", "b", "--plugin", plugin.name, "--set", "update.loss=cauchy", "--no-smoke"]
    assert runner.invoke(cli, args).exit_code == 0
    digest = hashlib.sha256(PLUGIN.encode()).hexdigest()
    # portable: the file's name and contents, not where it lay
    assert json.loads((out / MANIFEST).read_text())["plugins"] == [
        {"kind": "file", "name": "cauchy_plugin.py", "sha256": digest}
    ]
    monkeypatch.chdir(ROOT)
    reset_default_registry()  # as in a fresh process: only the built-ins
    with pytest.raises(BuildError, match=rf"made with the plug-in file cauchy_plugin\.py \(sha256 {digest[:12]}…\)"):
        load_build(out)
    copy = tmp_path / "elsewhere" / "renamed.py"  # the same plug-in anywhere, under any name
    copy.parent.mkdir()
    copy.write_text(PLUGIN)
    reloaded = load_build(out, [str(copy)])
    assert reloaded.loaded.spec.update.loss.name == "cauchy"
    tokens = torch.randint(256, (1, 20), generator=torch.Generator().manual_seed(2))
    again = build(MAC, ["update.loss=cauchy"], [str(copy)], smoke=False).module
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, reloaded.module(tokens).logits)


def test_cli_errors(stand_in, runner, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {vocab_size: 256, dim: 64}\nblocks:\n  - kind: mac\n    memory: {depht: 2}\n")
    result = runner.invoke(cli, ["build", str(bad), "-o", str(tmp_path / "b")])
    assert result.exit_code == 1 and f"{bad}:4:14: blocks.0.memory.depht: unknown key 'depht'" in result.output
    conflict = runner.invoke(cli, ["build", str(MAC), "-o", str(bad)])
    assert conflict.exit_code == 1 and "is a file, not a directory" in conflict.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("spec", shipped_specs(), ids=lambda p: p.stem)
def test_every_shipped_spec_builds_and_reloads_identically(runner, tmp_path, spec):
    out = tmp_path / "b"
    result = runner.invoke(cli, ["build", str(spec), "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST).read_text())
    assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == {
        name: sha256(out / name) for name in BUILD_FILES
    }
    reloaded = load_build(out)
    assert result.output.startswith(reloaded.report.summary())
    assert reloaded.report.smoke.finite and reloaded.report.total_parameters > 0
    tokens = torch.randint(reloaded.loaded.spec.model.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    again = build(spec, smoke=False).module.eval()
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, reloaded.module.eval()(tokens).logits)


def test_importing_the_package_imports_no_torch_and_exports_the_functions():
    script = textwrap.dedent("""
        import sys
        import titans_compose
        print("torch imported:", "torch" in sys.modules)
        import titans_compose.builder
        from titans_compose import build, load_build
        print(build is titans_compose.builder.build, load_build is titans_compose.builder.load_build)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["torch imported: False", "True True"]


@pytest.mark.parametrize("wrong", [REMOVED, *WRONG_TYPES.values()], ids=["removed", *WRONG_TYPES])
def test_a_malformed_build_manifest_is_refused_naming_it(stand_in, tmp_path, wrong):
    out = tmp_path / "b"
    build(MAC, output_dir=out, smoke=False)
    loaded, messages = refusals(out, load_build, BuildError, wrong)
    # versions are informational for a build: a version missing or unknown (None) still loads
    assert all(path.startswith("versions.") for path in loaded), loaded
    assert len(messages) >= 10  # every other field, at every depth


def test_an_entry_point_plugin_is_recorded_and_not_asked_for(stand_in, tmp_path, monkeypatch):
    namespace: dict = {}
    exec(PLUGIN, namespace)  # the Cauchy loss, as an installed package's entry point would register it
    ep = SimpleNamespace(name="cauchy_ep", value="cauchy_pkg:register", load=lambda: namespace["register"])
    monkeypatch.setenv("TITANS_COMPOSE_NO_ENTRY_POINTS", "0")
    monkeypatch.setattr("titans_compose.registry.plugins.entry_points", lambda group: [ep])
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [ep])
    reset_default_registry()
    out = tmp_path / "b"
    build(MAC, ["update.loss=cauchy"], output_dir=out, smoke=False)
    assert json.loads((out / MANIFEST).read_text())["plugins"] == [
        {"kind": "entry_point", "name": "cauchy_ep", "sha256": None}
    ]
    assert load_build(out).loaded.spec.update.loss.name == "cauchy"  # installed code, loaded by every run anyway


def test_a_manifest_naming_a_file_outside_the_build_is_refused(stand_in, tmp_path):
    out = tmp_path / "b"
    build(MAC, output_dir=out, smoke=False)
    (tmp_path / "outside").write_text("x")
    manifest = json.loads((out / MANIFEST).read_text())
    for name in ("../outside", str(tmp_path / "outside"), "./graph.dot", "graph.dot/"):
        files = {**manifest["files"], name: {"sha256": sha256(tmp_path / "outside"), "bytes": 1}}
        (out / MANIFEST).write_text(json.dumps({**manifest, "files": files}))
        with pytest.raises(BuildError, match=f"lists '{re.escape(name)}', which is not a file name inside {out}"):
            load_build(out)


def test_a_file_added_in_a_subdirectory_is_refused(stand_in, tmp_path):
    out = tmp_path / "b"
    build(MAC, output_dir=out, smoke=False)
    (out / "extra").mkdir()
    (out / "extra" / "planted.py").write_text("raise SystemExit")
    with pytest.raises(BuildError, match=r"holds extra/planted\.py, which manifest\.json does not list"):
        load_build(out)


def test_fields_added_later_hash_as_before_at_their_older_value():
    """A spec hashes alike with update.lr.scale / update.momentum.form unset or at their older values (none,
    paper), model-wide or in a block, so builds written before the fields existed still verify (the golden build
    tests/golden/build_v0 is loaded in tests/nn/test_memory_op.py); any other value changes the hash."""
    from titans_compose.registry import new_registry
    from titans_compose.spec import load_spec

    spec = SPECS / "titans_mac_small.yaml"  # sets neither

    def digest(*overrides):
        return builder.spec_hash(load_spec(spec, list(overrides), registry=new_registry()))

    plain = digest()
    assert digest("update.lr.scale=none", "blocks.0.update.momentum.form=paper") == plain
    for changed in ("update.lr.scale=head_dim", "update.momentum.form=ema", "blocks.0.update.momentum.form=ema"):
        assert digest(changed) != plain, changed
