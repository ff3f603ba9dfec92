"""Matmul work of the chunked dual form (memory-math.md section 3), for benchmark floors and achieved TFLOP/s.

Per chunk of b tokens and per (batch x head) row, with layers l = 1..L of shape (out_l, in_l), the forward must
multiply:

- the key path at the chunk-start weights, a_l W_l^T: [b, in_l] x [in_l, out_l] for every layer;
- the errors sent back through the layers above the first, delta_{l+1} W_{l+1}: [b, out_l] x [out_l, in_l];
- the retrieval at W^0, [b, in_l] x [in_l, out_l] for every layer; unless retrieval is per chunk, also the momentum
  term diag(B) H S^0T (the same shape, with momentum on) and the in-chunk correction (C o H A_l^T) Delta_l:
  [b, in_l] x [in_l, b] then [b, b] x [b, out_l];
- the chunk-end fold of W_l (and of S_l with momentum): [out_l, b] x [b, in_l] each.

A [m, k] x [k, n] product is 2 m k n FLOPs. The forward is the sum over the ceil(T / b) chunks (a trailing partial
chunk counted whole) and the rows; forward+backward counts each product with its two gradient products, 3x the
forward. Elementwise work and the backward's recomputation of the forward are not counted: this is the algorithm's
matmul work, the same for every implementation of these semantics.
"""

from __future__ import annotations

from typing import Protocol


class _Shape(Protocol):
    """What the count reads from a configuration (a ``MemoryConfig`` or a ``KernelKey``)."""

    layer_shapes: tuple[tuple[int, int], ...]
    momentum: bool
    retrieval: str


def chunk_matmuls(cfg: _Shape, rows: int, b: int) -> list[tuple[int, int, int, int]]:
    """The batched products [rows, m, k] x [rows, k, n] of one chunk's forward, as (rows, m, k, n)."""
    shapes = []
    layers = cfg.layer_shapes
    for out_f, in_f in layers:
        shapes.append((rows, b, in_f, out_f))  # key path a_l W_l^T
    for out_f, in_f in layers[1:]:
        shapes.append((rows, b, out_f, in_f))  # error delta_{l+1} W_{l+1}
    for out_f, in_f in layers:
        shapes.append((rows, b, in_f, out_f))  # retrieval through W^0
        if cfg.retrieval != "per_chunk":
            if cfg.momentum:
                shapes.append((rows, b, in_f, out_f))  # diag(B) H S^0T
            shapes += [(rows, b, in_f, b), (rows, b, b, out_f)]  # (C o H A^T) Delta
    for out_f, in_f in layers:
        shapes += [(rows, out_f, b, in_f)] * (2 if cfg.momentum else 1)  # fold W (and S)
    return shapes


def memory_flops(cfg: _Shape, rows: int, seq: int, chunk: int) -> tuple[int, int]:
    """(forward, forward+backward) matmul FLOPs of ``rows`` rows of ``seq`` tokens in chunks of ``chunk``."""
    per_chunk = sum(2 * r * m * k * n for r, m, k, n in chunk_matmuls(cfg, rows, chunk))
    forward = -(-seq // chunk) * per_chunk
    return forward, 3 * forward
