"""benchmarks/gpu_models.py without a GPU: the dry run takes the kernel path in Triton's interpreter and its row
agrees with the chunked path; a plain run on a CPU-only machine is refused with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_models.py"


def run_script(*args: str, cache) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TITANS_COMPOSE_CACHE=str(cache))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_dry_run_compares_the_kernel_path_with_the_chunked_path(tmp_path):
    """LMM's row: its memory layers ran the generated kernel, and the float32 loss, logits and worst parameter
    gradient of both paths equal the float64 reference within 1e-4 (the kernel tests' float32 tolerance)."""
    done = run_script("--dry-run", "--models", "LMM", cache=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| LMM |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "fp32" and cells[2] == "triton"
    for first in (3, 6):  # the kernel path's three columns, then the chunked path's
        loss, logits, worst = float(cells[first]), float(cells[first + 1]), float(cells[first + 2].split()[0])
        assert loss < 1e-4 and logits < 1e-4 and worst < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_run_without_a_gpu_is_refused(tmp_path):
    done = run_script("--models", "LMM", cache=tmp_path)
    assert done.returncode == 1 and "needs a CUDA GPU (or --dry-run)" in done.stderr
