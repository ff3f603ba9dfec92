"""Cross-field rules: constraints between fields that no single field's type can express.

Each rule looks at one validated block (with the model section) and yields findings with a path relative to the
block, so the report points at the field to change. Shape consistency between sections (e.g. memory width vs
model width without an output projection) is checked on the graph, by shape inference.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


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
