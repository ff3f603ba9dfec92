"""The pre-0.x import paths ``titans_compose.kernels`` and ``titans_compose.codegen`` keep working after the move to
``titans_compose.ops.memory``: same module objects, with a DeprecationWarning."""

from __future__ import annotations

import subprocess
import sys

import pytest

OLD_TO_NEW = [
    ("titans_compose.kernels.config", "titans_compose.ops.memory.config"),
    ("titans_compose.kernels.chunked", "titans_compose.ops.memory.chunked"),
    ("titans_compose.codegen.key", "titans_compose.ops.memory.codegen.key"),
    ("titans_compose.codegen.runtime", "titans_compose.ops.memory.codegen.runtime"),
]


@pytest.mark.parametrize(("old", "new"), OLD_TO_NEW)
def test_old_path_is_the_new_module_and_warns(old: str, new: str) -> None:
    # a fresh interpreter: this session may have imported the old package already (the warning comes once)
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"assert old is importlib.import_module({new!r}), 'not the same module'\n"
        "assert any(issubclass(w.category, DeprecationWarning) and 'moved to' in str(w.message) for w in caught)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_from_import_of_old_package() -> None:
    code = (
        "from titans_compose.kernels.config import MemoryConfig\n"
        "from titans_compose.codegen import emit\n"
        "print(emit.__name__)"
    )
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "titans_compose.ops.memory.codegen.emit"


def test_memory_config_at_its_old_home() -> None:
    from titans_compose.ops.memory import op

    with pytest.warns(DeprecationWarning, match="moved to titans_compose.ops.memory.op"):
        from titans_compose.ops.memory.config import memory_config
    assert memory_config is op.memory_config
