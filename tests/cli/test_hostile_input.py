"""Specs and sweep files that used to hang, fill memory, reach the allocator or write outside their folder.

Each is run as the CLI in a fresh process, killed after a timeout and with its address space capped, so that a
regression fails the test instead of the machine; the CPU time is that process's alone (``os.wait4``), and its peak
memory is the high-water mark of its own address space (``VmHWM``, read as it exits): ``ru_maxrss`` would count the
test session's pages that the forked child held until its exec (about 450 MB late in a full run).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT, SPECS
from titans_compose.cli.main import cli
from titans_compose.errors import SpecError
from titans_compose.io import default_dir
from titans_compose.spec import loader
from titans_compose.spec.loader import load_document

ADDRESS_SPACE = 4 << 30  # far above what validate needs (about 50 MB resident), far below the machine


@dataclass
class Run:
    code: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    cpu_s: float
    max_rss_mb: float | None  # None: killed before it could report


# runs the CLI as `python -m titans_compose.cli.main` does, and writes its peak resident memory (kB) to argv[1] at exit
_PEAK_WRAPPER = """
import atexit, runpy, sys
peak_file = sys.argv.pop(1)
def _write_peak():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(peak_file, "w") as out:
        out.write(peak)
atexit.register(_write_peak)
runpy.run_module("titans_compose.cli.main", run_name="__main__", alter_sys=True)
"""


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 60, env: dict[str, str] | None = None) -> Run:
    """``titans-compose ARGS`` in a fresh process, killed after ``timeout`` seconds."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp, "peak_kb")
        proc = subprocess.Popen(
            [sys.executable, "-c", _PEAK_WRAPPER, str(peak_file), *args],
            stdout=out,
            stderr=err,
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            preexec_fn=_cap_memory,
        )
        start = time.monotonic()
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > timeout:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                killed = True
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
        out.seek(0)
        err.seek(0)
        return Run(
            None if killed else proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            usage.ru_utime + usage.ru_stime,
            int(peak_file.read_text()) / 1024 if peak_file.is_file() else None,
        )


def spec_with(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text("model:\n  vocab_size: 256\n  dim: 128\n" + "".join(f"{line}\n" for line in lines))
    return path


# ------------------------------------------------------------------------------------------- sizes and counts


def test_a_billion_wide_model_is_refused_fast_and_small(tmp_path):
    """The issue's acceptance: `model.dim: 1000000000` exits 1 with a located TC306 in under 2 s and 300 MB."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("model:\n  vocab_size: 256\n  dim: 1000000000\nblocks:\n  - kind: mac\n")
    run = run_cli("validate", str(spec))
    assert run.code == 1, run
    assert f"{spec}:5:5: blocks.0: the model has about" in run.stderr and "[TC306]" in run.stderr
    assert run.cpu_s < 2 and run.max_rss_mb is not None and run.max_rss_mb < 300, (
        run
    )  # CPU time: other processes on the machine do not count


def test_a_billion_layers_are_refused_without_lowering_them(tmp_path):
    spec = spec_with(tmp_path, "blocks:", "  - kind: lmm", "    repeat: 1000000000")
    run = run_cli("validate", str(spec), timeout=30)
    assert run.code == 1, run
    assert f"{spec}:6:13: blocks.0.repeat: the blocks add up to 1,000,000,000 layers" in run.stderr
    assert run.cpu_s < 2 and run.max_rss_mb is not None and run.max_rss_mb < 300, run


def test_the_size_limits_are_raised_by_the_environment(tmp_path):
    spec = spec_with(tmp_path, "blocks:", "  - kind: lmm")
    wide = ("--set", "model.dim=200000")  # about 2.6e11 parameters: refused by default, fine to validate
    assert "[TC306]" in run_cli("validate", str(spec), *wide).stderr
    raised = {"TITANS_COMPOSE_MAX_PARAMS": "1e12", "TITANS_COMPOSE_MAX_ACTIVATIONS": "1e9"}
    run = run_cli("validate", str(spec), *wide, env=raised)
    assert run.code == 0 and run.stdout.startswith("ok: "), run
    run = run_cli("validate", str(spec), env={"TITANS_COMPOSE_MAX_PARAMS": "lots"})
    assert run.code == 1 and "$TITANS_COMPOSE_MAX_PARAMS: TITANS_COMPOSE_MAX_PARAMS='lots'" in run.stderr, run


def test_a_sweep_of_a_hundred_million_points_is_refused_before_they_are_made(tmp_path):
    grid = "".join(f"  x{i}: [{', '.join(str(v) for v in range(10))}]\n" for i in range(8))
    sweep = tmp_path / "big.yaml"
    sweep.write_text(f"base: {SPECS / 'titans_lmm_small.yaml'}\ngrid:\n{grid}")
    run = run_cli("sweep", str(sweep), "--dry-run", timeout=30)
    assert run.code == 1, run
    assert f"{sweep}:2:1: grid: the sweep has 100,000,000 points (10 grid.x0 x " in run.stderr
    assert "[TC308]" in run.stderr and run.cpu_s < 5, run


def _diamond(tmp_path: Path, levels: int) -> Path:
    """``levels`` pairs of files, each extending both files of the next level: 2**levels paths to the bottom."""
    (tmp_path / "bottom.yaml").write_text("model: {vocab_size: 256, dim: 64}\nblocks: [{kind: lmm}]\n")
    below = ["bottom.yaml"]
    for level in range(levels, 0, -1):
        names = [f"l{level}a.yaml", f"l{level}b.yaml"]
        for name in names:
            (tmp_path / name).write_text(f"extends: [{', '.join(below)}]\ndescription: {name}\n")
        below = names
    top = tmp_path / "top.yaml"
    top.write_text(f"extends: [{', '.join(below)}]\nname: diamond\n")
    return top


def test_an_extends_diamond_reads_each_file_once(tmp_path, monkeypatch):
    reads: list[str] = []
    read = loader.read_spec_file
    monkeypatch.setattr(loader, "read_spec_file", lambda path, *a: reads.append(str(path)) or read(path, *a))
    doc = load_document(_diamond(tmp_path, 4))
    assert doc.data["name"] == "diamond" and doc.data["description"] == "l1b.yaml"
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 2 * 4 + 2


def test_an_extends_diamond_of_32768_paths_loads_at_once(tmp_path):
    run = run_cli("validate", str(_diamond(tmp_path, 15)), timeout=30)
    assert run.code == 0 and run.cpu_s < 5, run


# ----------------------------------------------------------------------------------------------- bounded reads


def _devices(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: the old reader hung here
    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")
    return {"/dev/zero": Path("/dev/zero"), "a pipe": fifo, "a symlink to /dev/zero": link}


EXPECTED = {"/dev/zero": "a character device", "a pipe": "a pipe", "a symlink to /dev/zero": "a character device"}


def test_a_spec_that_is_a_device_or_pipe_is_refused(tmp_path):
    for what, path in _devices(tmp_path).items():
        run = run_cli("validate", str(path), timeout=20)
        assert run.code == 1, (what, run)
        assert f"{path}: {path} is {EXPECTED[what]}, not a regular file" in run.stderr and "[TC101]" in run.stderr


def test_extends_and_sweep_bases_that_are_devices_are_refused(tmp_path):
    for what, path in _devices(tmp_path).items():
        child = tmp_path / "child.yaml"
        child.write_text(f"extends: {path}\n")
        run = run_cli("validate", str(child), timeout=20)
        assert run.code == 1 and f"is {EXPECTED[what]}, not a regular file" in run.stderr, (what, run)
        sweep = tmp_path / "sweep.yaml"
        sweep.write_text(f"base: {path}\n")
        run = run_cli("sweep", str(sweep), "--dry-run", timeout=20)
        assert run.code == 1 and f"is {EXPECTED[what]}, not a regular file" in run.stderr, (what, run)
    fifo = tmp_path / "pipe.yaml"
    run = run_cli("sweep", str(fifo), "--dry-run", timeout=20)
    assert (
        run.code == 1
        and f"{fifo} is a pipe, not a regular file: refusing to read it as the sweep [TC101]" in run.stderr
    )


def test_a_spec_larger_than_4_mib_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (4 << 20) + "\n")
    with pytest.raises(SpecError) as err:
        load_document(big)
    assert err.value.codes == ["TC101"] and "holds more than 4,194,304 bytes" in err.value.render()


# ------------------------------------------------------------------------------------------ default output names


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs", "x/..", "../../x", ""])
def test_default_dir_never_leaves_its_folder(name):
    with pytest.raises(SpecError) as err:
        default_dir("build", name)
    assert err.value.codes == ["TC208"]


def test_default_dir_of_a_plain_name():
    assert default_dir("runs", "titans-mac-small") == Path("runs/titans-mac-small")


@pytest.mark.parametrize(
    "args",
    [("build", "--no-smoke"), ("train", "--steps", "1", "--batch", "1", "--seq-len", "16"), ("sweep",)],
    ids=["build", "train", "sweep"],
)
def test_a_file_named_after_the_parent_folder_writes_nothing_outside(tmp_path, monkeypatch, runner, args):
    """A spec (or sweep) without a name is named after its file: `...yaml` is named '..', which must not make
    build/.., runs/.. or sweeps/.. (the working directory) the output."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    source = work / "...yaml"
    if args[0] == "sweep":
        source.write_text(f"base: {SPECS / 'titans_lmm_small.yaml'}\nset: {{model.dim: 32}}\n")
    else:
        source.write_text("model: {vocab_size: 256, dim: 32}\nblocks: [{kind: lmm}]\n")
    result = runner.invoke(cli, [args[0], str(source), *args[1:]])
    assert result.exit_code == 1, result.output
    assert "name: '..' cannot name a folder inside" in result.stderr and "[TC208]" in result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["...yaml"]


def test_a_sweep_name_that_is_a_path_is_refused(tmp_path, runner):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {SPECS / 'titans_lmm_small.yaml'}\nname: ../../elsewhere\n")
    result = runner.invoke(cli, ["sweep", str(sweep), "--dry-run"])
    assert result.exit_code == 1
    assert f"{sweep}:2:7: name: '../../elsewhere' is not a safe file name" in result.stderr
