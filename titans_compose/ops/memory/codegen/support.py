"""What the generated kernels cover: why a configuration cannot run on them (it then runs on the chunked PyTorch
path). Every configuration they run has a generated backward too."""

from __future__ import annotations

from typing import Any

from titans_compose.ops.memory.codegen import tiling
from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.registry.rules import OPTIMIZERS

DTYPES = ("float32", "float16", "bfloat16")


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` or ``"float32"`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def unsupported_reason(cfg: MemoryConfig, dtype: Any) -> str | None:
    """Why the generated kernel cannot run ``cfg`` on inputs of ``dtype`` (None when it can)."""
    name = dtype_name(dtype)
    if name not in DTYPES:
        return f"inputs of dtype {name}: the generated kernels take {', '.join(DTYPES)}"
    if cfg.names is None:
        return "the memory config carries no registry names (build it with memory_config)"
    if cfg.optimizer not in (None, OPTIMIZERS["momentum"][0]):
        return "an optimizer rule other than the built-in momentum has no generated form"
    act, loss = cfg.activation, cfg.loss
    if None in (act.triton_fn, act.triton_grad, act.triton_grad2):
        return f"activation {cfg.names[0]!r} provides no Triton expressions (triton_fn/triton_grad/triton_grad2)"
    if None in (loss.triton_grad, loss.triton_grad2):
        return f"loss {cfg.names[1]!r} provides no Triton expressions (triton_grad/triton_grad2)"
    if tiling.hidden_tile(cfg.layer_shapes, cfg.chunk_size) is None:
        by_widths, by_areas = tiling.footprint(cfg.layer_shapes, cfg.chunk_size)
        over = []
        if by_widths > tiling.MAX_CHUNK_BY_WIDTHS:
            over.append(f"padded chunk x layer widths {by_widths} > {tiling.MAX_CHUNK_BY_WIDTHS}")
        if by_areas > tiling.MAX_CHUNK_BY_AREAS:
            over.append(f"padded chunk x layer areas {by_areas} > {tiling.MAX_CHUNK_BY_AREAS}")
        tiled = "hidden-dim tiling is generated for depth 2 only" if cfg.depth != 2 else "no hidden tile fits either"
        return f"{' and '.join(over)}: too large for one program per row with whole state matrices ({tiled})"
    return None
