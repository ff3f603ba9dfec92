"""The shipped specs: every one validates and compiles, resolves to a fixed point, and the schema file is current."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import SPECS, shipped_specs
from titans_compose.graph import compile_graph
from titans_compose.registry import new_registry
from titans_compose.spec import load_spec
from titans_compose.spec.schema import json_schema_text

VARIANTS = {
    "titans_mac_small.yaml": "mac",
    "titans_mag_small.yaml": "mag",
    "titans_mal_small.yaml": "mal",
    "titans_lmm_small.yaml": "lmm",
    "swa_baseline_small.yaml": "attention",
}


def test_the_variants_and_ablations_are_shipped():
    names = {p.relative_to(SPECS).as_posix() for p in shipped_specs()}
    assert set(VARIANTS) <= names
    ablations = {"linear_memory", "no_momentum", "no_forget", "no_conv", "no_persistent"}
    assert {f"ablations/{a}.yaml" for a in ablations} <= names


@pytest.mark.parametrize("path", shipped_specs(), ids=lambda p: p.relative_to(SPECS).as_posix())
def test_shipped_spec_validates_and_compiles(path):
    loaded = load_spec(path, registry=new_registry())
    assert loaded.warnings == []
    graph, report = compile_graph(loaded)
    assert report.ran == ["acyclic", "reachability", "shape_inference", "wiring", "backend"]
    assert all(data["shape"] is not None for _, data in graph.nodes(data=True))


@pytest.mark.parametrize("name,kind", sorted(VARIANTS.items()))
def test_variant_specs_declare_their_block_kind(name, kind):
    loaded = load_spec(SPECS / name, registry=new_registry())
    assert {b.kind for b in loaded.spec.blocks} == {kind}


@pytest.mark.parametrize("path", shipped_specs(), ids=lambda p: p.relative_to(SPECS).as_posix())
def test_resolved_spec_is_a_fixed_point(path, tmp_path):
    """The resolved spec (every default written out) validates to the same model."""
    registry = new_registry()
    loaded = load_spec(path, registry=registry)
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(yaml.safe_dump(loaded.spec.model_dump(mode="json", exclude={"extends"})))
    again = load_spec(resolved, registry=registry)
    assert again.spec == loaded.spec


ABLATION_CHANGES = {
    "linear_memory": {("memory", "depth"): 1},
    "no_momentum": {("update", "momentum", "enabled"): False},
    "no_forget": {("update", "forget", "enabled"): False},
    "no_conv": {("projections", "conv_kernel"): None},
    "no_persistent": {("persistent", "tokens"): 0},
}


def _flatten(value, prefix=()):
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        items = enumerate(value)
    else:
        return {prefix: value}
    out = {}
    for key, sub in items:
        out.update(_flatten(sub, (*prefix, key)))
    return out


@pytest.mark.parametrize("name", sorted(ABLATION_CHANGES))
def test_each_ablation_changes_exactly_one_thing(name):
    """An ablation spec differs from the MAC spec it extends only in its one component, model-wide and in every
    block (where the model-wide section is merged)."""
    registry = new_registry()
    base = load_spec(SPECS / "titans_mac_small.yaml", registry=registry).spec
    ablated = load_spec(SPECS / "ablations" / f"{name}.yaml", registry=registry).spec
    base_flat = _flatten(base.model_dump(mode="json", exclude={"name", "description"}))
    ablated_flat = _flatten(ablated.model_dump(mode="json", exclude={"name", "description"}))
    changed = {k: v for k, v in ablated_flat.items() if base_flat.get(k) != v}
    expected = {}
    for path, value in ABLATION_CHANGES[name].items():
        expected[path] = value
        for i in range(len(base.blocks)):
            expected[("blocks", i, *path)] = value
    assert changed == expected


def test_schema_file_is_in_sync():
    """specs/titans_compose.schema.json equals the schema generated from the built-ins; regenerate it with
    `titans-compose schema -o specs/titans_compose.schema.json`."""
    shipped = (SPECS / "titans_compose.schema.json").read_text()
    assert shipped == json_schema_text(new_registry())
    schema = json.loads(shipped)
    assert schema["required"] == ["model", "blocks"]
    assert schema["additionalProperties"] is False
