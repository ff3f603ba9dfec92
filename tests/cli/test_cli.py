"""The command line: light imports, outputs, file safety, exit codes and tracebacks only on --debug."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from tests.helpers import ROOT, SPECS
from titans_compose.cli.main import cli

MAC = str(SPECS / "titans_mac_small.yaml")


def test_spec_commands_do_not_import_torch(tmp_path):
    """validate, graph, schema and ls stay light: no torch import (it costs seconds and gigabytes)."""
    script = textwrap.dedent(f"""
        import sys
        from titans_compose.cli.main import cli
        for args in (["validate", {MAC!r}], ["graph", {MAC!r}], ["schema"], ["ls"]):
            try:
                cli(args, standalone_mode=False)
            except SystemExit:
                pass
        print("torch imported:", "torch" in sys.modules, "triton imported:", "triton" in sys.modules)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    assert "torch imported: False triton imported: False" in out.stdout


def test_console_script_runs(tmp_path):
    beside = os.path.join(os.path.dirname(sys.executable), "titans-compose")
    exe = beside if os.path.exists(beside) else shutil.which("titans-compose")
    if exe is None:
        pytest.skip("titans-compose is not installed on PATH (pip install -e .)")
    out = subprocess.run([exe, "validate", MAC], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok: ")


def test_validate_reports_each_spec(runner, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {vocab_size: 256, dim: 64}\nblocks:\n  - kind: mac\n    memory: {depht: 2}\n")
    result = runner.invoke(cli, ["validate", MAC, str(bad)])
    assert result.exit_code == 1
    assert f"ok: {MAC}: 2 layers" in result.output
    assert f"{bad}:4:14: blocks.0.memory.depht: unknown key 'depht' [TC201]" in result.output
    assert "did you mean 'depth'?" in result.output


def test_validate_resolved_prints_every_default(runner, tmp_path):
    result = runner.invoke(cli, ["validate", "--resolved", MAC, "--set", "memory.depth=3"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    assert resolved["memory"]["depth"] == 3 and resolved["blocks"][0]["memory"]["depth"] == 3
    assert resolved["update"]["lr"]["max_lr"] == 0.5 and resolved["attention"]["rope_theta"] == 10000.0
    again = tmp_path / "resolved.yaml"
    again.write_text(result.output)
    assert runner.invoke(cli, ["validate", str(again)]).exit_code == 0


def test_validate_prints_warnings_but_succeeds(runner):
    result = runner.invoke(cli, ["validate", MAC, "--set", "memory.init=zero"])
    assert result.exit_code == 0
    assert "warning: with zero initial weights a depth-2 memory never learns" in result.output
    assert "[TCW02]" in result.output


@pytest.mark.parametrize("fmt,marker", [("mermaid", "flowchart TD"), ("dot", "digraph")])
def test_graph_formats(runner, fmt, marker):
    result = runner.invoke(cli, ["graph", MAC, "--format", fmt])
    assert result.exit_code == 0 and result.output.startswith(marker)
    assert "memory : memory" in result.output and "read_ctx : memory_read" in result.output


def test_graph_output_file_is_written_whole_and_never_onto_the_spec(runner, tmp_path):
    out = tmp_path / "sub" / "g.mmd"
    result = runner.invoke(cli, ["graph", MAC, "-o", str(out)])
    assert result.exit_code == 0 and out.read_text().startswith("flowchart TD")
    assert [p.name for p in out.parent.iterdir()] == ["g.mmd"]  # no temporary file left behind
    spec = tmp_path / "mine.yaml"
    spec.write_text((SPECS / "titans_mac_small.yaml").read_text())
    before = spec.read_text()
    refused = runner.invoke(cli, ["graph", str(spec), "-o", str(spec)])
    assert refused.exit_code == 2 and "refusing to overwrite" in refused.output
    assert spec.read_text() == before


def test_png_needs_an_output_file_and_graphviz(runner, tmp_path, monkeypatch):
    assert runner.invoke(cli, ["graph", MAC, "--format", "png"]).exit_code == 2
    monkeypatch.setattr(shutil, "which", lambda name: None)
    result = runner.invoke(cli, ["graph", MAC, "--format", "png", "-o", str(tmp_path / "g.png")])
    assert result.exit_code == 1 and "Graphviz" in result.output and "apt-get install graphviz" in result.output
    assert not (tmp_path / "g.png").exists()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_png_with_graphviz(runner, tmp_path):
    out = tmp_path / "g.png"
    assert runner.invoke(cli, ["graph", MAC, "--format", "png", "-o", str(out)]).exit_code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schema_and_ls(runner, tmp_path):
    out = tmp_path / "schema.json"
    assert runner.invoke(cli, ["schema", "-o", str(out)]).exit_code == 0
    assert out.read_text() == (SPECS / "titans_compose.schema.json").read_text()
    listed = runner.invoke(cli, ["ls", "block"])
    assert listed.exit_code == 0
    for kind in ("mac", "mag", "mal", "lmm", "attention"):
        assert any(line.split()[:1] == [kind] for line in listed.output.splitlines())
    unknown = runner.invoke(cli, ["ls", "losses"])
    assert unknown.exit_code == 2 and "did you mean 'loss'" in unknown.output


def test_unknown_command_suggests(runner):
    result = runner.invoke(cli, ["valdate", MAC])
    assert result.exit_code == 2 and "Did you mean 'validate'?" in result.output


def test_internal_errors_show_a_traceback_only_with_debug(runner, monkeypatch):
    import titans_compose.graph as graph_module

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(graph_module, "compile_graph", broken)
    quiet = runner.invoke(cli, ["validate", MAC])
    assert quiet.exit_code == 3 and "internal error: RuntimeError: simulated bug" in quiet.output
    assert "--debug" in quiet.output and "Traceback" not in quiet.output
    loud = runner.invoke(cli, ["--debug", "validate", MAC])
    assert isinstance(loud.exception, RuntimeError)


def test_version(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and "titans-compose" in result.output


@pytest.mark.parametrize("command", ["build", "train", "export", "sweep"])
def test_every_directory_writing_command_takes_o_out_and_output(runner, command):
    result = runner.invoke(cli, [command, "--help"])
    assert result.exit_code == 0 and "-o, --out, --output" in result.output


@pytest.mark.parametrize("spelling", ["-o", "--out", "--output"])
def test_build_writes_to_each_spelling_of_the_output_option(runner, tmp_path, spelling):
    result = runner.invoke(cli, ["build", MAC, "--no-smoke", spelling, str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("number", "shown"),
    [
        (errno.ENOSPC, "No space left on device"),
        (errno.EDQUOT, "Disk quota exceeded"),
        (errno.EACCES, "Permission denied"),
        (errno.EPERM, "Operation not permitted"),
        (errno.EROFS, "Read-only file system"),
    ],
)
def test_environment_os_errors_are_user_errors_naming_the_path(runner, tmp_path, monkeypatch, number, shown):
    import titans_compose.manifest

    def failing(path, data):
        raise OSError(number, os.strerror(number), str(path))

    monkeypatch.setattr(titans_compose.manifest, "atomic_write", failing)
    result = runner.invoke(cli, ["build", MAC, "--no-smoke", "-o", str(tmp_path / "b")])
    assert result.exit_code == 1, result.output
    assert f"titans-compose: error: {shown}: {tmp_path / 'b'}" in result.output
    assert "internal error" not in result.output


def test_other_os_errors_stay_internal_errors(runner, tmp_path, monkeypatch):
    import titans_compose.manifest

    def failing(path, data):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF), str(path))  # a descriptor misused: a bug of ours

    monkeypatch.setattr(titans_compose.manifest, "atomic_write", failing)
    result = runner.invoke(cli, ["build", MAC, "--no-smoke", "-o", str(tmp_path / "b")])
    assert result.exit_code == 3 and "internal error: OSError: [Errno 9] Bad file descriptor" in result.output
