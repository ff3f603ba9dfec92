"""Shared fixtures: the repository's spec folder, a CLI runner, and isolation from installed plug-ins."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from tests.helpers import ROOT, SPECS, load_benchmark, shipped_specs

__all__ = ["ROOT", "SPECS", "load_benchmark", "shipped_specs"]  # helpers' names, still importable from here

# Tests see only the built-ins unless a test installs a plug-in itself.
os.environ.setdefault("TITANS_COMPOSE_NO_ENTRY_POINTS", "1")
# Without a GPU, generated kernels run in Triton's interpreter. It must be on before triton is first imported (triton
# builds its own library functions, such as tl.cdiv, at import): setting it later, in one test module's fixture,
# fails as soon as an earlier module has imported triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Generated kernel sources go to a cache of this test session, never the user's (tests that check the cache itself
# point TITANS_COMPOSE_CACHE at their own directories).
if "TITANS_COMPOSE_CACHE" not in os.environ:
    os.environ["TITANS_COMPOSE_CACHE"] = tempfile.mkdtemp(prefix="titans-compose-test-kernels-")
    atexit.register(shutil.rmtree, os.environ["TITANS_COMPOSE_CACHE"], True)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one intra-op thread is fastest, and on a shared machine extra threads only spin.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def runner():
    from click.testing import CliRunner

    return CliRunner()


@pytest.fixture(autouse=True)
def fresh_default_registry():
    """Each test starts from a registry with only the built-ins (plug-ins loaded by a test do not leak)."""
    from titans_compose.registry import reset_default_registry

    reset_default_registry()
    yield
    reset_default_registry()
