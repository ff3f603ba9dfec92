"""The size a spec is checked against: its parameter count is exactly the built model's, and each limit refuses
on its own with a located TC306 naming the setting that raises it."""

from __future__ import annotations

import pytest

import titans_compose
from tests.helpers import SPECS
from titans_compose.errors import SpecError
from titans_compose.registry import new_registry
from titans_compose.spec import load_spec
from titans_compose.spec.size import ACTIVATIONS_ENV, DEFAULT_MAX_PARAMS, PARAMS_ENV, model_size


@pytest.mark.parametrize(
    "spec,overrides",
    [
        ("titans_mac_small.yaml", ["norm.kind=layernorm", "projections.conv_kernel=null"]),
        ("titans_mag_small.yaml", ["mag.norms=false", "mlp.kind=gelu", "memory.init=zero", "memory.depth=3"]),
        ("titans_mal_small.yaml", ["model.tie_embeddings=true", "update.lr.gate=constant", "update.momentum=off"]),
        ("titans_lmm_small.yaml", ["memory.output_gate=none", "memory.readout_norm=false", "mlp.kind=none"]),
        ("swa_baseline_small.yaml", ["attention.head_dim=16", "persistent.tokens=7"]),
        ("ablations/linear_memory.yaml", ["mac.memory_norm=false", "memory.out_proj=false"]),
    ],
)
def test_parameter_count_is_the_built_models(spec, overrides):
    """Every block kind and every setting that adds or removes weights, against the module's numel (exact)."""
    loaded = load_spec(SPECS / spec, overrides, registry=new_registry())
    built = titans_compose.build(loaded, smoke=False).module
    assert sum(size.params for _, _, size in model_size(loaded.spec, loaded.registry)) == sum(
        p.numel() for p in built.parameters()
    )


def test_shipped_specs_are_far_below_the_default_limits():
    loaded = load_spec(SPECS / "titans_mac_small.yaml", registry=new_registry())
    total = sum(size.params for _, _, size in model_size(loaded.spec, loaded.registry))
    assert total * 1000 < DEFAULT_MAX_PARAMS


def test_each_limit_refuses_on_its_own(monkeypatch, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model:\n  vocab_size: 256\n  dim: 64\nblocks:\n  - kind: lmm\n    repeat: 2\n")
    monkeypatch.setenv(PARAMS_ENV, "1e17")
    with pytest.raises(SpecError) as err:
        load_spec(spec, ["model.dim=10000000"], registry=new_registry())
    assert err.value.codes == ["TC306"]
    (d,) = err.value.diagnostics
    assert "activation values per token" in d.message and ACTIVATIONS_ENV in d.hint
    assert (d.path, d.location.line, d.location.col) == ("blocks.0", 5, 5)
    monkeypatch.setenv(PARAMS_ENV, "100000")
    with pytest.raises(SpecError) as err:
        load_spec(spec, registry=new_registry())
    (d,) = err.value.diagnostics
    assert "parameters, more than the limit of 1e+05" in d.message and "blocks.0 (lmm x 2)" in d.message
    monkeypatch.setenv(ACTIVATIONS_ENV, "0")
    with pytest.raises(SpecError) as err:
        load_spec(spec, registry=new_registry())
    assert [d.location.file for d in err.value.diagnostics] == [f"${ACTIVATIONS_ENV}", str(spec)]
