"""The plug-in examples and check_rule: the example package installs with pip (offline) and its rules are found
through the entry point, usable from specs, listed, in the schema and consistent with the sequential reference;
the single-file example loads with --plugin; check_rule names what a broken rule gets wrong."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import ROOT, SPECS
from titans_compose.cli.main import cli
from titans_compose.registry import new_registry
from titans_compose.registry.plugins import load_plugin
from titans_compose.registry.rules import ACTIVATIONS, LOSSES, Activation, Loss, Retention
from titans_compose.testing import check_rule

pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE = ROOT / "examples" / "plugin_huber_memory"
SINGLE_FILE = ROOT / "examples" / "plugins" / "log_cosh.py"
TINY = ["model.dim=32", "memory.heads=1", "memory.head_dim=16", "memory.expansion=2", "blocks.0.repeat=1"]


@pytest.mark.slow
def test_the_example_package_installs_and_its_rules_work_from_the_entry_point(tmp_path):
    source, target = tmp_path / "package", tmp_path / "site"
    shutil.copytree(PACKAGE, source)  # setuptools builds in the source tree: keep the repository clean
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation"]
    done = subprocess.run([*install, "--target", str(target), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert list(target.glob("titans_compose_huber_memory-*.dist-info"))
    script = textwrap.dedent(
        f"""
        import json, torch
        from click.testing import CliRunner
        from titans_compose import build
        from titans_compose.cli.main import cli
        from titans_compose.testing import check_rule
        listed = CliRunner().invoke(cli, ["ls"]).output
        schema = CliRunner().invoke(cli, ["schema"]).output
        overrides = [*{TINY!r}, "update.loss={{name: pseudo_huber, delta: 0.5}}", "update.forget.rule=proximal_decay"]
        model = build({str(SPECS / "titans_lmm_small.yaml")!r}, overrides, smoke=True)
        spec = model.loaded.spec.blocks[0].update
        (memory,) = model.module.memory_backends()
        print(json.dumps({{
            "backend": memory[2],
            "listed": [line for line in listed.splitlines() if "pseudo_huber" in line or "proximal_decay" in line],
            "schema": "pseudo_huber" in schema and "proximal_decay" in schema,
            "spec": [spec.loss.name, spec.loss.delta, spec.forget.rule.name],
            "checked": [
                check_rule("loss", "pseudo_huber", {{"delta": 0.5}}),
                check_rule("retention", "proximal_decay"),
            ],
        }}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TITANS_COMPOSE_NO_ENTRY_POINTS"}
    env.update(PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert len(result["listed"]) == 2 and all("huber_memory" in line for line in result["listed"])
    assert result["schema"] and result["spec"] == ["pseudo_huber", 0.5, "proximal_decay"]
    # the loss gives its Triton expressions and any retention rule runs on the kernel: check_rule ran both through
    # the generated kernel too (4 more configs each, in the interpreter here), and on CUDA the layer would run it
    assert result["checked"] == [28, 28]
    assert "on CUDA this layer would run the generated kernel" in result["backend"]


def test_the_single_file_plugin_loads_and_passes_check_rule(runner):
    registry = new_registry()
    assert load_plugin(registry, str(SINGLE_FILE)) is None
    assert check_rule("loss", "log_cosh", registry=registry) == 24
    result = runner.invoke(
        cli,
        [
            "--plugin",
            str(SINGLE_FILE),
            "validate",
            str(SPECS / "titans_mac_small.yaml"),
            "--set",
            "update.loss=log_cosh",
        ],
    )
    assert result.exit_code == 0, result.output


def test_check_rule_names_what_a_broken_rule_gets_wrong():
    l2 = LOSSES["l2"][0]
    with pytest.raises(AssertionError, match=r"loss rule: grad\(err\) is not the derivative of value\(err\)"):
        check_rule("loss", Loss(l2.value, lambda e, p: e))  # the 2 is missing
    silu = ACTIVATIONS["silu"][0]
    with pytest.raises(AssertionError, match=r"backward\(g, x\) is not g \* grad\(x\)"):
        check_rule("activation", Activation(silu.fn, silu.grad, fused_backward=lambda g, x: g))
    with pytest.raises(AssertionError, match=r"grad2\(x\) is not the derivative of grad\(x\)"):
        check_rule("activation", dataclasses.replace(silu, grad2=lambda x: x.sigmoid()))
    with pytest.raises(AssertionError, match=r"grad2\(err\) is not the derivative of grad\(err\)"):
        check_rule("loss", dataclasses.replace(l2, grad2=lambda e, p: e.new_full((), 1.0)))  # half of l2's 2
    # the reference decays by keep and the chunked form by log_keep: they must describe the same factor
    halved = Retention(keep=lambda w, a, p: (1 - a) * w, log_keep=lambda a: (-a / 2).log1p())
    with pytest.raises(AssertionError, match=r"keep\(W, alpha\) is not exp\(log_keep\(alpha\)\) \* W"):
        check_rule("retention", halved)
    with pytest.raises(ValueError, match="check_rule checks a loss, activation, retention"):
        check_rule("optimizer", "momentum")


def test_check_rule_runs_the_generated_kernel_and_catches_a_wrong_triton_expression():
    """Under the interpreter (conftest turns it on without CUDA) a rule with Triton expressions also runs through
    the generated kernel; an expression that disagrees with the PyTorch form is named."""
    l2 = LOSSES["l2"][0]
    assert check_rule("loss", l2) == 28  # 24 reference-vs-chunked configurations + 4 kernel ones
    wrong = dataclasses.replace(l2, triton_grad="2.0 * e + 0.01")
    with pytest.raises(AssertionError, match="the generated kernel differs from the chunked path"):
        check_rule("loss", wrong)
    assert check_rule("loss", wrong, kernel=False) == 24
    with pytest.raises(ValueError, match="gives no Triton expressions"):
        check_rule("loss", dataclasses.replace(l2, triton_grad=None), kernel=True)


def test_the_chunked_path_applies_a_plugin_retention_rule_like_the_reference():
    """The reference decays with keep(W, alpha), the chunked form with exp(log_keep(alpha)): with the proximal
    decay (not the built-in) both agree only if the chunked form applies the rule."""
    sys.path.insert(0, str(PACKAGE))
    try:
        import huber_memory
    finally:
        sys.path.remove(str(PACKAGE))
    registry = new_registry()
    huber_memory.register(registry)
    assert check_rule("retention", "proximal_decay", registry=registry) == 28  # the kernel applies it too
    assert check_rule("loss", "pseudo_huber", {"delta": 2.0}, registry=registry, kernel=False) == 24
    alpha = torch.tensor([0.0, 0.5, 0.999])
    keep = huber_memory.proximal_log_keep(alpha).exp()
    assert torch.allclose(keep, 1 / (1 + alpha)) and bool((keep >= 0.5).all())
