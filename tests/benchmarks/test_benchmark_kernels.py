"""benchmarks/kernels.py without a GPU: one configuration of each of our implementations measured on the CPU in
Triton's interpreter (the code path the GPU run takes), and the clear refusal of a GPU run on a CPU-only machine."""

from __future__ import annotations

import importlib.util
import json
from argparse import Namespace

import pytest
import torch

from tests.helpers import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("kernels.py", "kernels_benchmark")


@pytest.mark.parametrize("impl", ["triton", "chunked", "ours-module"])
def test_one_configuration_measures(bench, impl, tmp_path, monkeypatch):
    monkeypatch.setenv("TITANS_COMPOSE_CACHE", str(tmp_path))
    args = Namespace(impl=impl, device="cpu", dtype="float32", seq=20, d=8, depth=2, width=16, rows=2, chunk=8)
    result = bench.measure(Namespace(**vars(args), warmup=0, repeats=1))
    assert result["status"] == "ok" and result["fwd_ms"] > 0 and result["fwd_bwd_ms"] > 0
    assert result["peak_gb"] is None  # measured on CUDA only


def test_what_cannot_run_is_reported_not_raised(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TITANS_COMPOSE_CACHE", str(tmp_path))
    args = dict(device="cpu", dtype="float32", seq=20, d=8, depth=1, width=16, rows=2, chunk=8, warmup=0, repeats=1)
    bench.worker(Namespace(**{**args, "impl": "triton", "chunk": 512}))  # wider than the generator handles
    status = json.loads(capsys.readouterr().out)["status"]
    assert status.startswith("unsupported: the generated kernel cannot run this memory: padded chunk x layer widths")
    if importlib.util.find_spec("fla") is None:
        bench.worker(Namespace(**args, impl="fla"))
        assert json.loads(capsys.readouterr().out) == {"status": "not installed (fla)"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_gpu_run_without_a_gpu_is_refused(bench):
    with pytest.raises(SystemExit, match="found none; run it with --dry-run"):
        bench.main(["--seqs", "64", "--no-record"])
