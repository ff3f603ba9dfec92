"""Size limits: a spec's layer count, parameter count and activations per token, refused beyond a limit before
anything is lowered or allocated.

The sizes are computed from the validated spec in closed form, one block at a time and multiplied by its
``repeat``, so checking a spec of a billion parameters or layers costs microseconds and allocates nothing.
``parameters`` counts every weight the built model holds (the memory's initial weights too, also when fixed at
zero), following the graph each block kind lowers to (titans_compose/graph/blocks.py); a plug-in block kind is
counted by the sections it takes. ``activations`` counts the values a forward pass keeps per token: the widths of
the intermediate tensors, summed over layers, plus the logits; what grows with the sequence (attention scores, the
memory's chunk products) is not in it.

The limits are spec-independent settings, the environment variables ``TITANS_COMPOSE_MAX_PARAMS`` and
``TITANS_COMPOSE_MAX_ACTIVATIONS``, so that a spec cannot raise its own limit; the layer count is capped at
:data:`MAX_LAYERS`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from titans_compose.errors import Diagnostic, Location
from titans_compose.registry.core import Registry
from titans_compose.spec.source import SourceDoc

MAX_LAYERS = 1024
PARAMS_ENV = "TITANS_COMPOSE_MAX_PARAMS"
ACTIVATIONS_ENV = "TITANS_COMPOSE_MAX_ACTIVATIONS"
DEFAULT_MAX_PARAMS = 2_000_000_000  # 8 GB of float32 weights, 32 GB with gradients and AdamW's moments
DEFAULT_MAX_ACTIVATIONS = 100_000_000  # per token: 100x a 24-layer model of width 1536


@dataclass(frozen=True)
class Size:
    """Parameters and activation values per token (both counts of numbers, not bytes)."""

    params: int = 0
    activations: int = 0

    def __add__(self, other: Size) -> Size:
        return Size(self.params + other.params, self.activations + other.activations)

    def __mul__(self, times: int) -> Size:
        return Size(self.params * times, self.activations * times)


def _norm(kind: str, features: int) -> Size:
    """A pre-norm over the model width: RMSNorm has a gain, LayerNorm a gain and a bias."""
    return Size(features * (2 if kind == "layernorm" else 1), features)


def _memory(block: Any, dim: int, registry: Registry, reads: int) -> Size:
    """The memory branch: gates, k and v (and ``reads`` query paths with their readouts), the initial weights."""
    mem, proj, update = block.memory, block.projections, block.update
    width = mem.heads * mem.head_dim
    shapes = registry.get("memory", mem.model).obj.layer_shapes(mem)
    state = mem.heads * sum(out_f * in_f for out_f, in_f in shapes)
    hidden = 2 * mem.heads * sum(out_f for out_f, _ in shapes)  # each memory layer's output before and after f
    gates = [update.lr, *(g for g in (update.momentum, update.forget) if g.enabled)]
    size = Size(sum(mem.heads * (1 + (dim if g.gate != "constant" else 0)) for g in gates), len(gates) * mem.heads)
    conv = proj.conv_kernel or 0
    path = Size(dim * width + width * conv, width * (2 if conv else 1))  # one projection with its conv
    size += path * 2 + Size(state, hidden)  # keys and values, the write
    read = path + Size(0, hidden + width)
    if mem.readout_norm:
        read += Size(width, width)
    if mem.output_gate != "none":
        read += Size(dim * width, 2 * width)
    if mem.out_proj:
        read += Size(width * dim, dim)
    return size + read * reads


def _attention(block: Any, dim: int) -> Size:
    att = block.attention
    inner = att.heads * (att.head_dim or dim // att.heads)
    return Size(4 * dim * inner, 4 * inner + dim)  # q, k, v and the output projection


def _mlp(block: Any, dim: int) -> Size:
    mlp = block.mlp
    if mlp.kind == "none":
        return Size()
    hidden = round(mlp.expansion * dim)
    if mlp.kind == "swiglu":
        hidden = -(-round(2 * hidden / 3) // 8) * 8
        return _norm(block.norm.kind, dim) + Size(3 * dim * hidden, 3 * hidden + 2 * dim)
    return _norm(block.norm.kind, dim) + Size(2 * dim * hidden, 2 * hidden + 2 * dim)


def layer_size(block: Any, dim: int, registry: Registry) -> Size:
    """One layer of ``block`` (a validated block) at model width ``dim``."""
    sections = registry.get("block", block.kind).obj.sections
    size = _norm(block.norm.kind, dim) + Size(0, 2 * dim) + _mlp(block, dim)  # the mixer's pre-norm and its add
    if "memory" in sections:
        size += _memory(block, dim, registry, reads=2 if "mac" in sections else 1)  # MAC reads before and after
    if "attention" in sections:
        size += _attention(block, dim)
    if "persistent" in sections:
        size += Size(block.persistent.tokens * dim, 0)
    if "mac" in sections and block.mac.memory_norm:
        size += _norm(block.norm.kind, dim)
    if "mag" in sections and block.mag.norms:
        size += _norm(block.norm.kind, dim) * 2
    return size


def model_size(spec: Any, registry: Registry) -> list[tuple[tuple[str | int, ...], str, Size]]:
    """The model's parts with their spec paths and names: the embeddings, head and final norm, then each block
    with all its copies (no loop over the copies). Their sum is the whole model's size."""
    model = spec.model
    embeddings = Size(model.vocab_size * model.dim * (1 if model.tie_embeddings else 2), model.dim + model.vocab_size)
    parts = [(("model",), "the embeddings and head", embeddings + _norm(spec.norm.kind, model.dim))]
    for i, b in enumerate(spec.blocks):
        size = layer_size(b, model.dim, registry) * b.repeat
        parts.append((("blocks", i), f"blocks.{i} ({b.kind} x {b.repeat})", size))
    return parts


def _limit(env: str, default: int) -> tuple[int, Diagnostic | None]:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default, None
    try:
        value = float(raw) if len(raw) <= 40 else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        return default, Diagnostic(
            "TC306",
            f"{env}={raw[:40]!r} is not a positive number",
            location=Location(f"${env}"),
            hint=f"set a whole number such as {default} or 5e9, or unset it for the default ({default:.0e})",
        )
    return int(value), None


def check_size(spec: Any, doc: SourceDoc, registry: Registry) -> list[Diagnostic]:
    """TC307 when the blocks' repeats add up to more than :data:`MAX_LAYERS` layers; TC306 when the parameters or
    the activations per token pass their limit (or a limit's setting is not a number)."""
    problems = []
    layers = 0
    for i, block in enumerate(spec.blocks):
        layers += block.repeat
        if layers > MAX_LAYERS:
            path = ("blocks", i, "repeat")
            problems.append(
                Diagnostic(
                    "TC307",
                    f"the blocks add up to {sum(b.repeat for b in spec.blocks):,} layers, more than {MAX_LAYERS}",
                    f"blocks.{i}.repeat",
                    doc.location(path) or doc.location(path[:2]),
                    "a model has tens of layers; check the repeat counts",
                )
            )
            break
    parts = model_size(spec, registry)
    for what, env, default, count in (
        ("parameters", PARAMS_ENV, DEFAULT_MAX_PARAMS, lambda s: s.params),
        ("activation values per token", ACTIVATIONS_ENV, DEFAULT_MAX_ACTIVATIONS, lambda s: s.activations),
    ):
        limit, bad = _limit(env, default)
        if bad is not None:
            problems.append(bad)
            continue
        total = sum(count(size) for _, _, size in parts)
        if total <= limit:
            continue
        path, name, size = max(parts, key=lambda part: count(part[2]))
        problems.append(
            Diagnostic(
                "TC306",
                f"the model has about {total:.3g} {what}, more than the limit of {limit:.3g}; the largest part is "
                f"{name} with {count(size):.3g}",
                ".".join(str(p) for p in path),
                doc.location(path, key=True) or doc.location(path),
                f"check the sizes (model.dim, vocab_size, memory heads, head_dim and expansion, persistent tokens, "
                f"repeat); to build a larger model deliberately, raise the limit with {env}",
            )
        )
    return problems
