"""The registry and plug-ins: clashes, unknown names, transactions, plug-ins from files and entry points, and the
numerical correctness of the built-in rule functions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import PLUGIN, ROOT, SPECS
from titans_compose.cli.main import cli
from titans_compose.errors import SpecError
from titans_compose.registry import default_registry, new_registry, reset_default_registry
from titans_compose.registry.core import RuleParams
from titans_compose.registry.plugins import load_plugin
from titans_compose.registry.rules import ACTIVATIONS, LOSSES, HuberParams, LpParams

SPEC_USING_PLUGIN = """\
model: {vocab_size: 256, dim: 64}
memory: {heads: 2, head_dim: 32}
update:
  loss: {name: cauchy, scale: 0.5}
blocks:
  - kind: lmm
"""


def test_duplicate_and_unknown_names():
    registry = new_registry()
    with pytest.raises(SpecError) as err:
        registry.register("loss", "l2", object())
    assert err.value.codes == ["TC502"] and "builtin" in err.value.diagnostics[0].message
    with pytest.raises(SpecError) as err:
        registry.register("lossses", "x", object())
    assert err.value.codes == ["TC503"] and "loss" in err.value.diagnostics[0].hint
    with pytest.raises(SpecError) as err:
        registry.get("activation", "sillu")
    assert err.value.codes == ["TC205"] and "silu" in err.value.diagnostics[0].hint
    with pytest.raises(SpecError):
        registry.register("loss", "not an identifier", object())


def test_builtins_cover_every_kind():
    registry = new_registry()
    assert set(registry.names("block")) == {"mac", "mag", "mal", "lmm", "attention"}
    assert set(registry.names("loss")) == {"l2", "l1", "lp", "huber"}
    assert {e.source for e in registry.entries()} == {"builtin"}


def test_a_failing_plugin_leaves_nothing_behind(tmp_path):
    bad = tmp_path / "half_plugin.py"
    bad.write_text(
        textwrap.dedent("""
        def register(registry):
            registry.register("activation", "half_done", object())
            raise RuntimeError("boom")
    """)
    )
    registry = new_registry()
    before = registry.names("activation")
    problem = load_plugin(registry, str(bad))
    assert problem is not None and problem.code == "TC501"
    assert str(bad) in problem.message and "boom" in problem.message
    assert registry.names("activation") == before


def test_plugin_without_register_and_missing_plugin(tmp_path):
    empty = tmp_path / "empty_plugin.py"
    empty.write_text("x = 1\n")
    registry = new_registry()
    assert "register" in load_plugin(registry, str(empty)).message
    assert "no such file" in load_plugin(registry, str(tmp_path / "nope.py")).message
    assert load_plugin(registry, "no_such_module_xyz").code == "TC501"


@pytest.mark.parametrize(
    "source",
    [
        "import sys\nsys.exit(0)\n",
        "def register(registry):\n    raise SystemExit(0)\n",
        "class Stop(BaseException):\n    pass\n\n\ndef register(registry):\n    raise Stop('odd')\n",
    ],
    ids=["sys_exit_on_import", "system_exit_in_register", "base_exception_subclass"],
)
def test_a_plugin_that_exits_fails_like_any_other(tmp_path, runner, monkeypatch, source):
    """A plug-in file or module that calls sys.exit (or raises another BaseException) is a TC501 failure: it
    cannot end the command with its own status, or with 0 and no output."""
    (tmp_path / "exiting_plugin_mod.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    for target in (str(tmp_path / "exiting_plugin_mod.py"), "exiting_plugin_mod"):
        registry = new_registry()
        problem = load_plugin(registry, target)
        assert problem is not None and problem.code == "TC501", target
        result = runner.invoke(cli, ["--plugin", target, "validate", str(SPECS / "titans_lmm_small.yaml")])
        assert result.exit_code == 1, result.output
        assert "[TC501]" in result.stderr and target in result.stderr and "ok" not in result.stdout
        sys.modules.pop("exiting_plugin_mod", None)


def test_ctrl_c_in_a_plugin_is_not_swallowed(tmp_path):
    plugin = tmp_path / "interrupted_plugin.py"
    plugin.write_text("def register(registry):\n    raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        load_plugin(new_registry(), str(plugin))


def test_plugin_params_must_subclass_ruleparams():
    from pydantic import BaseModel

    class Params(BaseModel):
        x: int = 1

    with pytest.raises(SpecError):
        new_registry().register("loss", "odd", object(), params=Params)


def test_plugin_file_adds_a_loss_seen_in_ls_validation_and_schema(tmp_path, runner):
    plugin = tmp_path / "cauchy_plugin.py"
    plugin.write_text(PLUGIN)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC_USING_PLUGIN)

    listed = runner.invoke(cli, ["--plugin", str(plugin), "ls", "loss"])
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if "cauchy" in line)
    assert "scale=1.0" in row and f"plugin {plugin}" in row

    ok = runner.invoke(cli, ["validate", str(spec), "--plugin", str(plugin)])
    assert ok.exit_code == 0, ok.output
    reset_default_registry()  # as in a new process: the plug-in is not loaded unless named again
    without = runner.invoke(cli, ["validate", str(spec)])
    assert without.exit_code == 1 and "[TC205]" in without.output and "cauchy" in without.output
    bad_param = runner.invoke(cli, ["--plugin", str(plugin), "validate", str(spec), "--set", "update.loss.scal=1"])
    assert bad_param.exit_code == 1 and "[TC201]" in bad_param.output and "scale" in bad_param.output

    schema = json.loads(runner.invoke(cli, ["schema", "--plugin", str(plugin)]).output)
    assert "Loss_cauchy" in schema["$defs"]
    assert schema["$defs"]["Loss_cauchy"]["properties"]["scale"]["exclusiveMinimum"] == 0


def test_a_broken_plugin_is_named_and_the_builtins_still_work(tmp_path, runner):
    """The specs are still checked with the built-ins (a bad one is reported), but with a plug-in missing the
    command fails and calls no spec ok."""
    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text("raise ImportError('missing dependency foo')\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {vocab_size: 256, dim: 64}\nmemory: {depth: 12}\nblocks: [{kind: lmm}]\n")
    result = runner.invoke(cli, ["--plugin", str(plugin), "validate", str(SPECS / "titans_mac_small.yaml"), str(bad)])
    assert result.exit_code == 1
    assert "broken_plugin.py" in result.output and "missing dependency foo" in result.output
    assert f"{bad}:2:17: memory.depth" in result.output and "[TC204]" in result.output
    assert "ok" not in result.stdout and "Traceback" not in result.output


def _entry_point_env(tmp_path, target: str) -> dict[str, str]:
    """A throwaway installed distribution advertising ``target`` in the titans_compose.plugins group."""
    dist = tmp_path / "throwaway_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: throwaway-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[titans_compose.plugins]\nthrowaway = {target}\n")
    env = dict(os.environ)
    env.pop("TITANS_COMPOSE_NO_ENTRY_POINTS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    return env


def _run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (entry points are read once per process)."""
    return subprocess.run(
        [sys.executable, "-m", "titans_compose.cli.main", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_entry_point_plugin_is_loaded(tmp_path):
    (tmp_path / "throwaway_cauchy.py").write_text(PLUGIN)
    env = _entry_point_env(tmp_path, "throwaway_cauchy")
    out = _run_cli(env, "ls", "loss")
    assert out.returncode == 0, out.stderr
    assert any("cauchy" in line and "plugin throwaway" in line for line in out.stdout.splitlines())


def test_broken_entry_point_plugin_is_reported_by_name(tmp_path):
    (tmp_path / "throwaway_broken.py").write_text("def register(registry):\n    raise ValueError('bad')\n")
    env = _entry_point_env(tmp_path, "throwaway_broken:register")
    out = _run_cli(env, "ls", "block")
    assert out.returncode == 1
    assert "plug-in 'throwaway'" in out.stderr and "bad" in out.stderr
    assert "mac" in out.stdout and "Traceback" not in out.stderr


def test_entry_point_plugin_that_exits_is_reported_by_name(tmp_path):
    (tmp_path / "throwaway_exit.py").write_text("import sys\nsys.exit(0)\n")
    out = _run_cli(_entry_point_env(tmp_path, "throwaway_exit"), "validate", str(SPECS / "titans_lmm_small.yaml"))
    assert out.returncode == 1, out.stdout
    assert "plug-in 'throwaway'" in out.stderr and "sys.exit(0)" in out.stderr and "[TC501]" in out.stderr
    assert "ok" not in out.stdout


def test_default_registry_loads_each_plugin_once(tmp_path):
    plugin = tmp_path / "cauchy_plugin.py"
    plugin.write_text(PLUGIN)
    registry, problems = default_registry([str(plugin)])
    again, problems_again = default_registry([str(plugin)])
    assert again is registry and problems == problems_again == []
    assert registry.names("loss").count("cauchy") == 1


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_gradients_match_autograd(name):
    loss, _, _ = LOSSES[name]
    params = {"lp": LpParams(p=2.5), "huber": HuberParams(delta=0.3)}.get(name)
    torch.manual_seed(0)
    err = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(loss.value(err, params).sum(), err)
    torch.testing.assert_close(loss.grad(err, params), auto, rtol=1e-12, atol=1e-12)
    # the second derivative the hand-written chunk backward uses (l1's and huber's grad have no graph: 0 or 1)
    grad = loss.grad(err, params)
    (auto2,) = torch.autograd.grad(grad.sum(), err) if grad.requires_grad else (torch.zeros_like(err),)
    if name == "huber":
        auto2 = (err.abs() <= params.delta).to(err.dtype)
    torch.testing.assert_close(loss.grad2(err, params).expand_as(err), auto2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_derivatives_match_autograd(name):
    act, _ = ACTIVATIONS[name]
    torch.manual_seed(1)
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(act.fn(x).sum(), x, create_graph=True)
    torch.testing.assert_close(act.grad(x.detach()), auto, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(act.derivative(x.detach()), auto, rtol=1e-12, atol=1e-12)
    (auto2,) = torch.autograd.grad(auto.sum(), x) if auto.requires_grad else (torch.zeros_like(x),)
    m = torch.randn(64, dtype=torch.float64)
    torch.testing.assert_close(act.curvature(m, x.detach()), m * auto2, rtol=1e-12, atol=1e-12)
    reference = {
        "silu": torch.nn.functional.silu,
        "gelu": torch.nn.functional.gelu,
        "relu": torch.relu,
        "identity": lambda t: t,
    }[name]
    torch.testing.assert_close(act.fn(x), reference(x), rtol=1e-12, atol=1e-12)


def test_rule_params_forbid_unknown_keys():
    with pytest.raises(Exception, match="extra"):
        LpParams(p=2, q=3)
    assert issubclass(LpParams, RuleParams)
