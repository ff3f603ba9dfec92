"""``MemoryOp``: everything one memory layer needs, as one typed value.

Lowering (``titans_compose.graph.blocks``) makes it from a validated block; the graph carries it on the layer's
``memory`` node, where passes may replace it (``dataclasses.replace(op, chunk_size=...)``); and it is the only input
from which a memory module is built (:class:`~titans_compose.nn.memory.NeuralMemory`, which is also the model's
layer). Names of registered parts (activations, the loss, the update rules) stay names here: :meth:`MemoryOp.config`
resolves them against a registry into the scan's :class:`~titans_compose.ops.memory.config.MemoryConfig`, the only
place that configuration is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.registry.core import Registry


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


@dataclass(frozen=True)
class LossOp:
    """The associative loss: its registry name and parameters as sorted (name, value) pairs."""

    name: str = "l2"
    params: tuple[tuple[str, Any], ...] = ()


#: ``LrGate.scale`` values: what theta is divided by ("none": 1, "head_dim": the key width d)
LR_SCALES = ("none", "head_dim")
#: ``MomentumGate.form`` values: "paper" S = eta S - theta g; "ema" S = eta S - (1 - eta) theta g
MOMENTUM_FORMS = ("paper", "ema")


@dataclass(frozen=True)
class LrGate:
    """theta_t = max_lr * sigmoid(z_t) / (d if ``scale`` is "head_dim" else 1), z from a gate of ``granularity``
    starting at ``init`` (before the scale)."""

    granularity: str = "per_token"
    init: float = 0.1
    max_lr: float = 0.5
    scale: str = "none"

    def __post_init__(self) -> None:
        if self.scale not in LR_SCALES:
            raise ValueError(f"lr scale must be one of {LR_SCALES}, got {self.scale!r}")

    @property
    def bias(self) -> float:
        """The gate's initial logit: theta_0 = init (before the scale)."""
        return _logit(self.init / self.max_lr)

    def factor(self, head_dim: int) -> float:
        """What multiplies max_lr * sigmoid(z): 1, or 1 / d for the "head_dim" scale."""
        return 1.0 / head_dim if self.scale == "head_dim" else 1.0


@dataclass(frozen=True)
class MomentumGate:
    """The momentum decay eta_t = sigmoid(z_t) and the registered optimiser ``rule`` that uses it. ``form``: "paper"
    (S_t = eta_t S_{t-1} - theta_t g_t, one gradient's cumulative step theta / (1 - eta)) or "ema" (the same
    recurrence with theta_t replaced by (1 - eta_t) theta_t: an exponential moving average of the gradients, whose
    cumulative step is theta whatever eta)."""

    enabled: bool = True
    granularity: str = "per_token"
    init: float = 0.9
    rule: str = "momentum"
    form: str = "paper"

    def __post_init__(self) -> None:
        if self.form not in MOMENTUM_FORMS:
            raise ValueError(f"momentum form must be one of {MOMENTUM_FORMS}, got {self.form!r}")

    @property
    def ema(self) -> bool:
        """Whether the step is scaled by (1 - eta): the EMA form with momentum on."""
        return self.enabled and self.form == "ema"

    @property
    def bias(self) -> float:
        """The gate's initial logit: eta_0 = init."""
        return _logit(self.init)


@dataclass(frozen=True)
class ForgetGate:
    """The forget rate alpha_t = sigmoid(z_t), starting at a ``half_life`` in tokens, and the retention ``rule``."""

    enabled: bool = True
    granularity: str = "per_token"
    half_life: float = 2048.0
    rule: str = "decay"

    @property
    def bias(self) -> float:
        """The gate's initial logit: alpha_0 = 1 - 2^(-1/half_life)."""
        return _logit(1.0 - 2.0 ** (-1.0 / self.half_life))


@dataclass(frozen=True)
class Projections:
    """q / k / v: linear map, ``activation``, depthwise causal conv of ``conv_kernel`` (None: none), l2 norm."""

    activation: str = "silu"
    conv_kernel: int | None = 4
    qk_l2norm: bool = True


@dataclass(frozen=True)
class MemoryOp:
    """One memory layer (memory-math.md sections 1-3): x [B, T, in_features] -> [B, T, out_features].

    Shapes: ``heads`` memories of ``layer_shapes`` ((out, in) per linear layer, mapping ``head_dim`` to itself).
    The memory MLP: ``activation``, ``residual``, ``output_norm``. The inner loop: ``loss``, the ``lr``,
    ``momentum`` and ``forget`` gates, ``grad_clip``, ``chunk_size``, ``retrieval``, ``checkpoint``. M_0: ``init``
    (learned or zero). Around the scan: ``projections``, ``readout_norm`` (RMSNorm per head with ``eps``),
    ``output_gate`` and ``out_proj`` (to ``out_width``). ``backend``: the implementation asked for (None: the
    environment's choice, else auto)."""

    in_features: int
    heads: int
    head_dim: int
    layer_shapes: tuple[tuple[int, int], ...]
    out_width: int
    activation: str = "silu"
    residual: bool = False
    output_norm: bool = False
    loss: LossOp = LossOp()
    lr: LrGate = LrGate()
    momentum: MomentumGate = MomentumGate()
    forget: ForgetGate = ForgetGate()
    grad_clip: float | None = None
    chunk_size: int = 16
    retrieval: str = "after"
    checkpoint: bool = False
    init: str = "learned"
    projections: Projections = Projections()
    readout_norm: bool = True
    output_gate: str = "sigmoid"
    out_proj: bool = True
    eps: float = 1e-6
    backend: str | None = None

    @property
    def width(self) -> int:
        """heads * head_dim: the width of q, k, v and of the retrieved values."""
        return self.heads * self.head_dim

    @property
    def out_features(self) -> int:
        """The output width: ``out_width`` with the output projection, else the heads' width."""
        return self.out_width if self.out_proj else self.width

    def config(self, registry: Registry) -> MemoryConfig:
        """The scan's configuration, the registered parts resolved in ``registry``."""
        loss = registry.get("loss", self.loss.name)
        loss_params = loss.params(**dict(self.loss.params)) if loss.params is not None else None
        return MemoryConfig(
            layer_shapes=self.layer_shapes,
            activation=registry.get("activation", self.activation).obj,
            loss=loss.obj,
            loss_params=loss_params,
            residual=self.residual,
            output_norm=self.output_norm,
            momentum=self.momentum.enabled,
            forget=self.forget.enabled,
            chunk_size=self.chunk_size,
            retrieval=self.retrieval,
            grad_clip=self.grad_clip,
            retention=registry.get("retention", self.forget.rule).obj,
            optimizer=registry.get("optimizer", self.momentum.rule).obj,
            checkpoint=self.checkpoint,
            names=(self.activation, self.loss.name),
            gates=(self.lr.granularity, self.momentum.granularity, self.forget.granularity),
        )

    @classmethod
    def from_sections(
        cls,
        in_features: int,
        memory: Any,
        update: Any,
        projections: Any,
        registry: Registry,
        *,
        out_width: int | None = None,
        eps: float = 1e-6,
    ) -> MemoryOp:
        """The op of validated ``memory``, ``update`` and ``projections`` spec sections (None: the default
        projections) reading ``in_features`` wide inputs and projecting back to ``out_width`` (default: the input
        width). Lowering calls this; it reads the sections' fields and imports nothing of the spec language."""
        loss = update.loss.model_dump()
        loss.pop("name")
        lr, momentum, forget = update.lr, update.momentum, update.forget
        proj = Projections() if projections is None else projections
        return cls(
            in_features=in_features,
            heads=memory.heads,
            head_dim=memory.head_dim,
            layer_shapes=tuple(
                (int(o), int(i)) for o, i in registry.get("memory", memory.model).obj.layer_shapes(memory)
            ),
            out_width=in_features if out_width is None else out_width,
            activation=memory.activation,
            residual=memory.residual,
            output_norm=memory.output_norm,
            loss=LossOp(update.loss.name, tuple(sorted(loss.items()))),
            lr=LrGate(lr.gate, lr.init, lr.max_lr, lr.scale),
            momentum=MomentumGate(momentum.enabled, momentum.gate, momentum.init, momentum.rule.name, momentum.form),
            forget=ForgetGate(forget.enabled, forget.gate, forget.half_life, forget.rule.name),
            grad_clip=update.grad_clip,
            chunk_size=memory.chunk_size,
            retrieval=memory.retrieval,
            checkpoint=memory.checkpoint,
            init=memory.init,
            projections=Projections(proj.activation, proj.conv_kernel, proj.qk_l2norm),
            readout_norm=memory.readout_norm,
            output_gate=memory.output_gate,
            out_proj=memory.out_proj,
            eps=eps,
        )


def memory_config(memory: Any, update: Any, registry: Registry) -> MemoryConfig:
    """Resolve a validated ``memory`` and ``update`` section into a :class:`MemoryConfig`: the config of the
    :class:`MemoryOp` of those sections."""
    width = memory.heads * memory.head_dim
    return MemoryOp.from_sections(width, memory, update, None, registry).config(registry)
