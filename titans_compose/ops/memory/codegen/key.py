"""The kernel key: every structural setting the generated Triton code depends on, in canonical form.

Two memory configurations with equal keys run the same generated source; any difference in a field below gives
different source and a different cache entry. The digest also covers the generator's version and the triton and
torch versions, so upgrading either never reuses stale code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from titans_compose.ops.memory.codegen import tiling
from titans_compose.ops.memory.config import MemoryConfig, MemoryShape

#: Bump whenever the generated source changes for an unchanged key.
GENERATOR_VERSION = 5

_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class KernelKey(MemoryShape):
    """One generated kernel's specialisation.

    ``layer_shapes`` are the memory MLP's (out, in) shapes (they give the depth, head dim and hidden widths);
    ``loss_params`` are the loss's parameters as sorted (name, value) pairs; ``gates`` the granularity of the
    (lr, momentum, forget) gates; ``dtype`` the dtype of q, k, v (state and accumulation stay float32);
    ``expressions`` the rules' Triton expressions by role (``act``, ``act_grad``, ``act_grad2``, ``loss_grad``,
    ``loss_grad2``; None where a rule gives none), so that changing a rule's code changes the key and the
    generator needs no registry; ``hidden_tile`` the columns of the hidden width one program holds at a time (0:
    whole matrices; :func:`~titans_compose.ops.memory.codegen.tiling.hidden_tile`); ``grad_clip`` the per-token
    inner gradient clip's max norm (None: no clip).
    """

    layer_shapes: tuple[tuple[int, int], ...]
    activation: str
    residual: bool
    output_norm: bool
    ln_eps: float
    loss: str
    loss_params: tuple[tuple[str, Any], ...]
    momentum: bool
    forget: bool
    gates: tuple[str, str, str]
    retrieval: str
    chunk_size: int
    dtype: str
    expressions: tuple[tuple[str, str | None], ...] = ()
    hidden_tile: int = 0
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"kernel dtype must be one of {_DTYPES}, got {self.dtype!r}")

    @property
    def hidden_dims(self) -> tuple[int, ...]:
        """The widths between layers (empty for a matrix memory)."""
        return tuple(out for out, _ in self.layer_shapes[:-1])

    def canonical(self) -> str:
        """The key with the generator, triton and torch versions, as sorted compact JSON."""
        import torch
        import triton

        fields = asdict(self)
        fields["versions"] = {"generator": GENERATOR_VERSION, "triton": triton.__version__, "torch": torch.__version__}
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """A short stable hash of :meth:`canonical` (names cache files and generated modules)."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:20]

    def slug(self) -> str:
        """A readable prefix for file names: depth, activation, loss, chunk and dtype."""
        tiled = f"_h{self.hidden_tile}" if self.hidden_tile else ""
        return f"d{self.depth}_{self.activation}_{self.loss}_b{self.chunk_size}{tiled}_{self.dtype}"


def kernel_key(cfg: MemoryConfig, dtype: str) -> KernelKey:
    """The key of ``cfg`` run on inputs of ``dtype`` (e.g. ``"float32"``). ``cfg`` must carry its registry
    names (configs made by :func:`~titans_compose.ops.memory.op.memory_config` do)."""
    if cfg.names is None:
        raise ValueError("this MemoryConfig has no registry names; build it with memory_config() to key a kernel")
    params = cfg.loss_params.model_dump() if cfg.loss_params is not None else {}
    params.pop("name", None)
    layer_shapes = tuple(tuple(s) for s in cfg.layer_shapes)
    return KernelKey(
        layer_shapes=layer_shapes,
        activation=cfg.names[0],
        residual=cfg.residual,
        output_norm=cfg.output_norm,
        ln_eps=cfg.ln_eps,
        loss=cfg.names[1],
        loss_params=tuple(sorted(params.items())),
        momentum=cfg.momentum,
        forget=cfg.forget,
        gates=cfg.gates,
        retrieval=cfg.retrieval,
        chunk_size=cfg.chunk_size,
        dtype=dtype,
        expressions=rule_expressions(cfg),
        hidden_tile=tiling.hidden_tile(layer_shapes, cfg.chunk_size) or 0,
        grad_clip=None if cfg.grad_clip is None else float(cfg.grad_clip),
    )


def rule_expressions(cfg: MemoryConfig) -> tuple[tuple[str, str | None], ...]:
    """The activation's and the loss's Triton expressions in ``cfg``, by role (loss parameters still as
    ``{name}`` fields)."""
    act, loss = cfg.activation, cfg.loss
    return (
        ("act", act.triton_fn),
        ("act_grad", act.triton_grad),
        ("act_grad2", act.triton_grad2),
        ("loss_grad", loss.triton_grad),
        ("loss_grad2", loss.triton_grad2),
    )
