"""The matmul FLOP count of the chunked dual form against closed forms worked out by hand
(titans_compose.ops.memory.flops docstring), and against the products a chunk of the chunked path actually runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from titans_compose.ops.memory.flops import chunk_matmuls, memory_flops


def shape(layers, momentum=True, retrieval="after"):
    return SimpleNamespace(layer_shapes=layers, momentum=momentum, retrieval=retrieval)


@pytest.mark.parametrize("b", [1, 16, 64])
@pytest.mark.parametrize("d", [8, 64])
def test_depth_one(b, d):
    rows, chunks = 3, 5
    seq = chunks * b
    # per chunk and row: key path, retrieval at W^0 and the fold of W, each 2 b d^2
    plain = shape(((d, d),), momentum=False, retrieval="per_chunk")
    assert memory_flops(plain, rows, seq, b) == (rows * chunks * 6 * b * d * d, 3 * rows * chunks * 6 * b * d * d)
    # per token with momentum: + diag(B) H S^0T (2 b d^2), the correction (C o H A^T) Delta (2 b^2 d twice) and
    # the fold of S (2 b d^2)
    full = shape(((d, d),))
    assert memory_flops(full, rows, seq, b)[0] == rows * chunks * (10 * b * d * d + 4 * b * b * d)


def test_depth_two_with_a_partial_chunk():
    d, h, b, rows = 16, 64, 8, 2
    layers = ((h, d), (d, h))
    # key path 4bdh, error through W_2 2bdh, retrieval 4bdh, momentum term 4bdh, folds of W and S 8bdh, and the
    # corrections 2b^2(d + h) per layer
    per_chunk = 22 * b * d * h + 4 * b * b * (d + h)
    forward, both = memory_flops(shape(layers), rows, 3 * b + 1, b)  # the partial fourth chunk counts whole
    assert forward == rows * 4 * per_chunk and both == 3 * forward
    assert memory_flops(shape(layers, retrieval="before"), rows, 4 * b, b)[0] == forward


def test_each_product_is_listed_with_the_rows():
    products = chunk_matmuls(shape(((32, 8), (8, 32)), momentum=False), rows=7, b=4)
    assert {r for r, *_ in products} == {7}
    assert len(products) == 2 + 1 + 2 * 3 + 2  # key path, one error, retrieval + correction per layer, folds
