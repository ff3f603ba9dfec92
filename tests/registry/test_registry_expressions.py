"""Registration checks each activation's and loss's Triton expressions against its torch forms (expressions.py):
the built-ins agree, a plug-in whose expression is wrong is refused naming the rule, the field and the worst point,
and while torch is not imported the check waits for the rule's first lookup instead of importing it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import ROOT
from titans_compose.errors import SpecError
from titans_compose.registry import expressions, new_registry
from titans_compose.registry.plugins import load_plugin
from titans_compose.registry.rules import ACTIVATIONS, LOSSES, Activation, HuberParams

SILU = ACTIVATIONS["silu"][0]

WRONG_PLUGIN = '''
"""A plug-in whose activation's Triton derivative is sigmoid(x), not silu's derivative."""
from titans_compose.registry.rules import ACTIVATIONS


def register(registry):
    silu = ACTIVATIONS["silu"][0]
    registry.register(
        "activation",
        "bad_silu",
        silu.__class__(silu.fn, silu.grad, triton_fn=silu.triton_fn,
                       triton_grad="1.0 / (1.0 + tl.exp(-x))", triton_grad2=silu.triton_grad2, grad2=silu.grad2),
    )
'''


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_builtin_losses_agree(name):
    loss, params, _ = LOSSES[name]
    assert expressions.mismatch("loss", name, loss, params) is None


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_builtin_activations_agree(name):
    assert expressions.mismatch("activation", name, ACTIVATIONS[name][0]) is None


def test_a_wrong_plugin_rule_is_refused_naming_the_rule_field_and_worst_point(tmp_path):
    plugin = tmp_path / "bad_silu_plugin.py"
    plugin.write_text(WRONG_PLUGIN)
    registry = new_registry()
    failure = load_plugin(registry, str(plugin))
    assert failure is not None and failure.code == "TC501"
    assert "activation 'bad_silu'" in failure.message and "triton_grad" in failure.message
    # sigmoid(x) misses silu's x sigmoid(x) (1 - sigmoid(x)), largest near x = 1.54 (the grid's 1.55)
    assert "worst at x = 1.55, where the expression gives 0.8249137318 and grad gives 1.048781885" in failure.message
    assert "bad_silu" not in registry.names("activation")  # the transaction undid it


def test_register_raises_tc504_and_keeps_the_registry_unchanged():
    registry = new_registry()
    version = registry.version
    wrong = dataclasses.replace(SILU, triton_fn="x * (1.0 / (1.0 + tl.exp(-x))) + 1e-3")
    with pytest.raises(SpecError) as info:
        registry.register("activation", "shifted_silu", wrong)
    (diag,) = info.value.diagnostics
    assert diag.code == "TC504" and "triton_fn" in diag.message and "torch fn" in diag.message
    assert "shifted_silu" not in registry.names("activation") and registry.version == version


def test_a_loss_is_checked_at_its_parameter_defaults():
    huber = LOSSES["huber"][0]
    wrong = dataclasses.replace(huber, triton_grad="tl.minimum(tl.maximum(e, -2.0 * {delta}), 2.0 * {delta})")
    problem = expressions.mismatch("loss", "wide_huber", wrong, HuberParams)
    assert problem is not None and "triton_grad" in problem and "worst at e =" in problem
    unknown = dataclasses.replace(huber, triton_grad="tl.minimum(e, {width})")
    assert "names a parameter it does not have" in expressions.mismatch("loss", "h", unknown, HuberParams)


def test_a_second_derivative_without_grad2_is_compared_with_autograd():
    no_grad2 = dataclasses.replace(SILU, grad2=None)
    assert expressions.mismatch("activation", "silu_autograd", no_grad2) is None
    wrong = dataclasses.replace(no_grad2, triton_grad2="0.0 * x")
    assert "triton_grad2" in expressions.mismatch("activation", "flat", wrong)


def test_standard_library_helpers_and_unknown_names_are_refused():
    sigmoid = dataclasses.replace(SILU, triton_fn="x * tl.sigmoid(x)")
    assert "tl.sigmoid is a triton.language.standard" in expressions.mismatch("activation", "s", sigmoid)
    unknown = dataclasses.replace(SILU, triton_fn="tl.no_such_function(x)")
    assert "tl.no_such_function is not a Triton builtin" in expressions.mismatch("activation", "u", unknown)


def test_rules_without_expressions_are_not_checked():
    assert expressions.mismatch("activation", "plain", Activation(SILU.fn, SILU.grad)) is None
    assert expressions.mismatch("retention", "decay", object()) is None


def test_the_check_costs_milliseconds():
    rule = dataclasses.replace(SILU, triton_fn="x * (1.0 / (1.0 + tl.exp(-x))) + 0.0")  # a new rule: not memoised
    expressions.mismatch("activation", "warm", rule)
    start = time.perf_counter()
    assert expressions.mismatch("activation", "timed", rule) is None
    assert time.perf_counter() - start < 0.25  # about 3 ms on two idle CPU cores; generous for loaded machines


def test_without_torch_the_check_waits_for_the_first_lookup(tmp_path):
    (tmp_path / "bad_silu_plugin.py").write_text(WRONG_PLUGIN)
    script = textwrap.dedent(f"""
        import sys
        from titans_compose.registry import new_registry
        from titans_compose.registry.plugins import load_plugin
        registry = new_registry()
        print("loaded:", load_plugin(registry, {str(tmp_path / "bad_silu_plugin.py")!r}) is None)
        print("torch imported:", "torch" in sys.modules)
        registry.get("activation", "bad_silu")  # torch still absent: nothing can run the rule yet
        import torch
        registry.get("activation", "silu")
        try:
            registry.get("activation", "bad_silu")
        except Exception as exc:
            print("refused:", exc.diagnostics[0].code)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["loaded: True", "torch imported: False", "refused: TC504"]


@pytest.mark.parametrize("name", ["silu", "gelu"])
def test_the_check_runs_on_the_cpu_inside_a_meta_device_context(name):
    """transformers builds a model under ``torch.device("meta")``, where a first registry is made: the check must
    compute real values there, not meta tensors (which cannot be compared)."""
    import torch

    with torch.device("meta"):
        assert expressions.mismatch("activation", name, ACTIVATIONS[name][0]) is None
