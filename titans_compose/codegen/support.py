"""What the generated kernels cover: why a configuration cannot run on them (it then runs on the chunked PyTorch
path), and which options' backward is not generated."""

from __future__ import annotations

from typing import Any

from titans_compose.codegen.emit import block
from titans_compose.codegen.key import KernelKey
from titans_compose.kernels.config import MemoryConfig
from titans_compose.registry.rules import OPTIMIZERS

#: One program holds a row's every state matrix and the chunk's b x width intermediates (no hidden-dim tiling is
#: generated yet), so its shared memory grows with the padded chunk times the padded layer widths, and with the
#: largest layer (:func:`footprint`). Compiled for sm_90 (H100: 227 KB of shared memory per block), the backward of
#: every configuration within both limits needed at most 196 KB (depth 1, head dim 64, chunk 64: 196 KB; depth 2,
#: 64 / 128, chunk 16: 188 KB; depth 3, 32 / 64, chunk 32: 176 KB) and every one above them more than 227 KB
#: (depth 2, 64 / 128, chunk 32: 241 KB; depth 1, head dim 128, chunk 16: 246 KB; depth 3, 32 / 32, chunk 64:
#: 266 KB; depth 2, 64 / 64, chunk 64: 328 KB; depth 1, head dim 128, chunk 64: 508 KB; depth 2, 64 / 256,
#: chunk 64: 934 KB).
MAX_CHUNK_BY_WIDTHS = 5120
MAX_LAYER_AREA = 8192
DTYPES = ("float32", "float16", "bfloat16")


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` or ``"float32"`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def footprint(cfg: MemoryConfig) -> tuple[int, int]:
    """(padded chunk x sum of padded layer input widths, largest padded layer area): the measures bounded by
    :data:`MAX_CHUNK_BY_WIDTHS` and :data:`MAX_LAYER_AREA`."""
    widths = sum(block(inp) for _, inp in cfg.layer_shapes)
    area = max(block(out) * block(inp) for out, inp in cfg.layer_shapes)
    return block(cfg.chunk_size) * widths, area


def unsupported_reason(cfg: MemoryConfig, dtype: Any) -> str | None:
    """Why the generated kernel cannot run ``cfg`` on inputs of ``dtype`` (None when it can)."""
    name = dtype_name(dtype)
    if name not in DTYPES:
        return f"inputs of dtype {name}: the generated kernels take {', '.join(DTYPES)}"
    if cfg.names is None:
        return "the memory config carries no registry names (build it with memory_config)"
    if cfg.grad_clip is not None:
        return "grad_clip: the generated kernels do not take the per-token inner gradient clip yet"
    if cfg.optimizer not in (None, OPTIMIZERS["momentum"][0]):
        return "an optimizer rule other than the built-in momentum has no generated form"
    act, loss = cfg.activation, cfg.loss
    if None in (act.triton_fn, act.triton_grad, act.triton_grad2):
        return f"activation {cfg.names[0]!r} provides no Triton expressions (triton_fn/triton_grad/triton_grad2)"
    if None in (loss.triton_grad, loss.triton_grad2):
        return f"loss {cfg.names[1]!r} provides no Triton expressions (triton_grad/triton_grad2)"
    by_widths, area = footprint(cfg)
    over = [f"padded chunk x layer widths {by_widths} > {MAX_CHUNK_BY_WIDTHS}"] * (by_widths > MAX_CHUNK_BY_WIDTHS)
    over += [f"a layer of {area} > {MAX_LAYER_AREA} padded weights"] * (area > MAX_LAYER_AREA)
    if over:
        return (
            f"{' and '.join(over)}: too large for one program per row (whole state matrices in one program; no "
            "hidden-dim tiling generated yet)"
        )
    return None


def backward_fallback_reason(key: KernelKey) -> str | None:
    """Why the backward of ``key`` would recompute through the chunked PyTorch path instead of a generated kernel.

    Always None: every key that :func:`unsupported_reason` admits has the generated backward (every depth, loss,
    activation, residual / LayerNorm, momentum / forget and retrieval mode, checked against autograd through the
    chunked path in tests/test_codegen_kernels.py). A future option whose backward is not generated says so here."""
    return None
