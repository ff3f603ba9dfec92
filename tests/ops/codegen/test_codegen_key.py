"""The kernel key: canonical, hashed with the versions, and different whenever the generated code would differ."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.helpers import make_cfg
from titans_compose.ops.memory.codegen.key import GENERATOR_VERSION, kernel_key


def named(**kw):
    cfg = make_cfg(depth=2, d=16, hidden=32, loss="l2", activation="silu", **kw)
    return dataclasses.replace(cfg, names=("silu", "l2"))


def test_the_canonical_key_is_sorted_json_with_the_versions():
    import torch
    import triton

    key = kernel_key(named(), "float32")
    data = json.loads(key.canonical())
    assert list(data) == sorted(data)
    versions = {"generator": GENERATOR_VERSION, "triton": triton.__version__, "torch": torch.__version__}
    assert data["versions"] == versions
    assert data["layer_shapes"] == [[32, 16], [16, 32]] and data["dtype"] == "float32"
    assert key.digest() == kernel_key(named(), "float32").digest()
    assert key.slug() == "d2_silu_l2_b16_float32"


@pytest.mark.parametrize(
    "change",
    [
        dict(momentum=False),
        dict(forget=False),
        dict(retrieval="per_chunk"),
        dict(chunk_size=8),
        dict(residual=True),
        dict(output_norm=True),
    ],
)
def test_every_structural_setting_changes_the_digest(change):
    assert kernel_key(named(), "float32").digest() != kernel_key(named(**change), "float32").digest()


def test_dtype_and_rule_code_change_the_digest():
    cfg = named()
    assert kernel_key(cfg, "float32").digest() != kernel_key(cfg, "bfloat16").digest()
    # the same registry name with different Triton code must not reuse a cached kernel
    edited = dataclasses.replace(cfg.activation, triton_fn="x * 0.5 * (1.0 + tl.math.erf(x))")
    other = kernel_key(dataclasses.replace(cfg, activation=edited), "float32")
    assert kernel_key(cfg, "float32").digest() != other.digest()


def test_a_config_without_registry_names_cannot_be_keyed():
    with pytest.raises(ValueError, match="memory_config"):
        kernel_key(make_cfg(depth=1, d=16, hidden=16, loss="l2", activation="silu"), "float32")
    with pytest.raises(ValueError, match="kernel dtype"):
        kernel_key(named(), "float64")
