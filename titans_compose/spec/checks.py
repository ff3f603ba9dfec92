"""Cross-field rules: constraints between fields that no single field's type can express.

Each rule looks at one validated block (with the model section) and yields findings with a path relative to the
block, so the report points at the field to change. Shape consistency between sections (e.g. memory width vs
model width without an output projection) is checked on the graph, by shape inference.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from titans_compose.spec.stability import stable_theta


@dataclass(frozen=True)
class Finding:
    code: str
    path: tuple[str, ...]
    message: str
    hint: str = ""
    severity: str = "error"


def check_block(block: Any, model: Any) -> Iterator[Finding]:
    """Every cross-field rule that ``block`` (a validated block of any kind) breaks."""
    attention = getattr(block, "attention", None)
    if attention is not None and attention.head_dim is None and model.dim % attention.heads:
        yield Finding(
            "TC301",
            ("attention", "heads"),
            f"attention.heads = {attention.heads} does not divide model.dim = {model.dim}",
            "choose heads dividing the width, or set attention.head_dim explicitly",
        )
    memory = getattr(block, "memory", None)
    mac = getattr(block, "mac", None)
    if mac is not None and memory is not None and mac.segment % memory.chunk_size:
        yield Finding(
            "TC302",
            ("mac", "segment"),
            f"mac.segment = {mac.segment} is not a multiple of memory.chunk_size = {memory.chunk_size}",
            "the memory is written once per segment, so segments must end on chunk boundaries: use a segment that "
            "is a multiple of the chunk size",
        )
    update = getattr(block, "update", None)
    if update is not None and update.lr.init >= update.lr.max_lr:
        yield Finding(
            "TC303",
            ("update", "lr", "init"),
            f"update.lr.init = {update.lr.init} must be below update.lr.max_lr = {update.lr.max_lr}",
            "theta = max_lr * sigmoid(.), so its initial value lies strictly between 0 and max_lr",
        )
    if memory is not None and memory.init == "zero" and memory.depth > 1:
        yield Finding(
            "TCW02",
            ("memory", "init"),
            f"with zero initial weights a depth-{memory.depth} memory never learns: every layer's gradient is zero",
            "use init: learned (the default) or depth: 1",
            severity="warning",
        )
    if update is not None and memory is not None and memory.retrieval != "per_chunk":
        chunked = [
            name
            for name in ("lr", "momentum", "forget")
            if getattr(update, name).gate == "per_chunk" and getattr(getattr(update, name), "enabled", True)
        ]
        if chunked:
            yield Finding(
                "TCW03",
                ("update", chunked[0], "gate"),
                f"per_chunk gates ({', '.join(chunked)}) average over the whole chunk, so with retrieval "
                f"'{memory.retrieval}' a token's output depends on later tokens of its chunk",
                "for a causal model use per_token or constant gates, or memory.retrieval: per_chunk",
                severity="warning",
            )
    if update is not None and memory is not None:
        yield from _inner_divergence(memory, update, getattr(block, "projections", None))


def _inner_divergence(memory: Any, update: Any, projections: Any) -> Iterator[Finding]:
    """TCW04 when the largest theta the lr gate can produce (max_lr, over head_dim with ``lr.scale: head_dim``)
    leaves the depth-1 stability region at the declared momentum and forget rate (docs/stability.md). Only where the
    analysis is exact: a matrix memory without output LayerNorm (which bounds the output whatever the weights), the
    built-in l2 loss, momentum and decay rules, unit keys (qk_l2norm) and no gradient clip (a clip bounds every
    step, so growth is at most linear). The paper's momentum form is checked at the declared eta (its region shrinks
    to nothing as eta -> 1); the EMA form over the gate's whole range, where the worst eta is 0 (section 5)."""
    if memory.depth != 1 or memory.output_norm or update.loss.name != "l2" or update.grad_clip is not None:
        return
    if projections is None or not projections.qk_l2norm:
        return
    momentum, forget = update.momentum, update.forget
    if (momentum.enabled and momentum.rule.name != "momentum") or (forget.enabled and forget.rule.name != "decay"):
        return
    ema = momentum.enabled and momentum.form == "ema"
    eta = momentum.init if momentum.enabled and not ema else 0.0
    alpha = -math.expm1(-math.log(2.0) / forget.half_life) if forget.enabled else 0.0
    bound = stable_theta(eta, alpha, memory.chunk_size)
    factor = 1.0 / memory.head_dim if update.lr.scale == "head_dim" else 1.0
    max_lr = update.lr.max_lr
    if max_lr * factor <= bound.theta:
        return
    safe = _round_down(bound.theta / factor)
    if ema:
        rule = "EMA momentum (update.momentum.form: ema; checked at its worst decay, eta -> 0)"
    elif momentum.enabled:
        rule = f"momentum eta = {eta:g} (update.momentum.init)"
    else:
        rule = "no momentum"
    forgetting = f"forget rate alpha = {alpha:.2g} (half_life {forget.half_life:g})" if forget.enabled else "no forget"
    repeats = f" (a chunk's {memory.chunk_size} steps add up)" if memory.chunk_size > 1 else ""
    scaled = f" (theta = max_lr / {memory.head_dim} with lr.scale: head_dim)" if factor != 1.0 else ""
    lower_init = f" and update.lr.init below it (now {update.lr.init:g})" if update.lr.init >= safe else ""
    cumulative = "2 theta / (1 - eta)" if momentum.enabled and not ema else "2 theta"
    others = "lower the chunk size" if ema else "lower the momentum or the chunk size"
    yield Finding(
        "TCW04",
        ("update", "lr", "max_lr"),
        f"update.lr.max_lr = {max_lr:g} lets the inner update diverge{scaled}: a depth-1 memory without "
        f"output_norm, with {rule}, {forgetting} and memory.chunk_size = {memory.chunk_size}, stays bounded only "
        f"for theta <= {bound.repeated:.3g} when a key repeats{repeats} and theta <= {bound.fresh:.3g} for keys "
        f"that come back after their momentum has landed (the cumulative step {cumulative} must stay <= 2)",
        f"lower update.lr.max_lr to {safe:g}{lower_init}, or {others}, or set memory.output_norm: true or "
        "update.grad_clip (see docs/stability.md)",
        severity="warning",
    )


def _round_down(value: float) -> float:
    """``value`` rounded down to two significant digits: a bound to quote that is itself inside the region (the
    relative 1e-9 keeps a bound that is round in exact arithmetic, such as 1 - eta, from losing a digit)."""
    if value <= 0:
        return 0.0
    scale = 10.0 ** (math.floor(math.log10(value)) - 1)
    return math.floor(value / scale * (1 + 1e-9)) * scale
