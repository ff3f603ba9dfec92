"""The spec language: pydantic v2 models of a whole Titans model.

A spec has model-wide sections (``memory``, ``update``, ``projections``, ``persistent``, ``attention``, ``mac``,
``mag``, ``mlp``, ``norm``) and a list of ``blocks``. Each block names its ``kind`` (a tagged union with a
required tag) and may override any section it takes; the loader merges the model-wide sections into every block
first, so a validated block is complete. Defaults follow the paper and docs/memory-math.md; ``titans-compose
validate --resolved`` prints every one of them.

Names that plug-ins can add (memory models, activations, losses, retention rules, optimisers, attention kinds,
block kinds) are checked against the registry, so the models are built per registry state by
:func:`spec_model`; unknown keys are errors everywhere (``extra="forbid"``) and no type is coerced (strict mode).
"""

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    create_model,
    field_validator,
)
from pydantic_core import PydanticCustomError

from titans_compose.errors import did_you_mean
from titans_compose.registry.core import Registry

Granularity = Literal["per_token", "per_chunk", "constant"]
GRANULARITY_HELP = (
    "per_token: one value per token from a linear layer + sigmoid (paper); per_chunk: the mean over each chunk; "
    "constant: one learned value per head"
)
#: a ``name`` (of a spec or a sweep) names its default output folder (``build/<name>``), so it is a file-name slug
NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"
NAME_HELP = "letters, digits, '.', '_' and '-', not starting with '.', at most 128 characters"
SECTIONS = ("memory", "update", "projections", "persistent", "attention", "mac", "mag", "mlp", "norm")
MAC_ORDER_PARTS = ("persistent", "memory", "segment")


class Section(BaseModel):
    """Base of every spec model: unknown keys are errors, types are not coerced, values are immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True, allow_inf_nan=False)


class ModelSection(Section):
    vocab_size: int = Field(ge=2, description="number of token ids (256 for byte-level text)")
    dim: int = Field(ge=1, description="model width D: embedding and residual stream size")
    tie_embeddings: bool = Field(False, description="share the embedding matrix with the LM head")
    init_std: float = Field(0.02, gt=0, description="std of the normal init of embeddings and linear layers")


class NormSpec(Section):
    kind: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description="pre-norm of each sublayer and final norm")
    eps: float = Field(1e-6, gt=0, description="epsilon added to the variance")


class MLPSpec(Section):
    kind: Literal["swiglu", "gelu", "none"] = Field(
        "swiglu", description="block MLP after the mixer: SwiGLU (Llama), GELU, or none"
    )
    expansion: float = Field(
        4.0,
        gt=0,
        description="hidden width = expansion * dim for gelu; 2/3 of that (rounded up to a multiple of 8) for "
        "swiglu, so both have the same parameter count",
    )


class PersistentSpec(Section):
    tokens: int = Field(
        4, ge=0, description="number N_p of learned, input-independent persistent memory tokens (0 = none)"
    )


class MACSpec(Section):
    segment: int = Field(
        128,
        ge=1,
        description="segment length C: attention runs within a segment; the memory is read before "
        "and written after each segment (must be a multiple of memory.chunk_size)",
    )
    causal_memory_tokens: bool = Field(
        True,
        description="mask the retrieved memory tokens h causally (h_j is visible from position j on); false lets "
        "every position of a segment see all of the segment's memory tokens",
    )
    gate: Literal["sigmoid", "silu", "identity"] = Field(
        "sigmoid",
        description="o = y * gate(M(y)): sigmoid (a nonlinear gate, as titans-pytorch and the paper's MAG use), silu, "
        "or identity (the plain product; it multiplies two small quantities at initialisation and learns slowly)",
    )
    memory_norm: bool = Field(
        True,
        description="normalise the attention output y (the block's norm kind) before the memory writes it and reads "
        "M(y) with it: y is not normalised and starts about 10x smaller than the block input, which leaves the "
        "memory's values too small to learn from; false feeds y unchanged",
    )
    order: list[Literal["persistent", "memory", "segment"]] = Field(
        default_factory=lambda: list(MAC_ORDER_PARTS),
        description="order of the attention context: [persistent, memory, segment] (arXiv) or "
        "[persistent, segment, memory] (NeurIPS text)",
    )

    @field_validator("order")
    @classmethod
    def _is_permutation(cls, order: list[str]) -> list[str]:
        if sorted(order) != sorted(MAC_ORDER_PARTS):
            raise PydanticCustomError(
                "TC304",
                "order must list persistent, memory and segment once each, got {got}",
                {"got": order},
            )
        return order


class MAGSpec(Section):
    gate: Literal["sigmoid", "silu", "linear"] = Field(
        "sigmoid",
        description="o = norm_a(y) * gate(norm_b(m)): sigmoid (paper), silu, or linear (no nonlinearity)",
    )
    norms: bool = Field(True, description="learned normalisations norm_a, norm_b on both branches before gating")


def _check_name(value: str) -> str:
    if re.fullmatch(NAME_PATTERN, value) is None:
        raise PydanticCustomError(
            "TC208", "'{value}' is not a safe file name, and a name names an output folder", {"value": value[:200]}
        )
    return value


#: the type of a ``name``: a slug that can name a folder (never a path: ``../x`` or ``/x`` are refused)
SafeName = Annotated[
    str,
    AfterValidator(_check_name),
    WithJsonSchema({"type": "string", "pattern": NAME_PATTERN, "maxLength": 128}),
]


def _registry_name(registry: Registry, kind: str) -> Any:
    """A string that must be a registered ``kind`` name; the JSON schema lists the names as an enum."""
    names = registry.names(kind)

    def check(value: str) -> str:
        if value not in names:
            raise PydanticCustomError(
                "TC205",
                "unknown {kind} '{value}'",
                {"kind": kind, "value": value, "hint": did_you_mean(value, names)},
            )
        return value

    return Annotated[str, AfterValidator(check), WithJsonSchema({"type": "string", "enum": names})]


def _toggle_shorthand(value: Any) -> Any:
    return {"enabled": value} if isinstance(value, bool) else value


def _tag_check(kind: str, tag: str, names: list[str], shorthand: bool, input_type: Any) -> BeforeValidator:
    """Expand ``"name"`` to ``{tag: "name"}`` (when ``shorthand``) and reject unregistered tags with a hint."""

    def check(value: Any) -> Any:
        if shorthand and isinstance(value, str):
            value = {tag: value}
        if isinstance(value, dict) and tag in value and value[tag] not in names:
            raise PydanticCustomError(
                "TC205",
                "unknown {kind} '{value}'",
                {"kind": kind, "value": value[tag], "hint": did_you_mean(str(value[tag]), names)},
            )
        return value

    return BeforeValidator(check, json_schema_input_type=input_type)


def _tagged_union(registry: Registry, kind: str, tag: str, models: dict[str, type[BaseModel]] | None = None) -> Any:
    """A union of one model per registered ``kind`` name, discriminated by the required field ``tag``.

    Without ``models``, each member is the entry's ``params`` model plus the tag, and a bare string is shorthand
    for ``{tag: string}``.
    """
    members = []
    for entry in registry.entries(kind):
        if models is not None:
            members.append(models[entry.name])
            continue
        member = create_model(
            f"{kind.capitalize()}_{entry.name}",
            __base__=entry.params or Section,
            __doc__=entry.description or None,
            **{tag: (Literal[entry.name], Field(description=f"registered {kind} name"))},
        )
        member.model_config.update(extra="forbid", strict=True, frozen=True)
        member.model_rebuild(force=True)
        members.append(member)
    union = members[0] if len(members) == 1 else Annotated[Union[tuple(members)], Field(discriminator=tag)]  # noqa: UP007
    names = registry.names(kind)
    shorthand = models is None
    input_type = Union[Literal[tuple(names)], union] if shorthand else union  # noqa: UP007
    return Annotated[union, _tag_check(kind, tag, names, shorthand, input_type)]


def build_spec_model(registry: Registry) -> type[BaseModel]:
    """Build the top-level ``Spec`` model for the current registry (plug-in names included)."""
    activation_name = _registry_name(registry, "activation")
    memory_model = _registry_name(registry, "memory")
    attention_kind = _registry_name(registry, "attention")
    loss_rule = _tagged_union(registry, "loss", "name")
    optimizer = _tagged_union(registry, "optimizer", "name")
    retention = _tagged_union(registry, "retention", "name")

    class MemorySpec(Section):
        model: memory_model = Field("mlp", description="registered memory model")  # type: ignore[valid-type]
        heads: int = Field(4, ge=1, description="number of independent memory heads H")
        head_dim: int = Field(64, ge=1, description="key/value width d of each head")
        depth: int = Field(2, ge=1, le=8, description="number of linear layers L of the memory MLP (1 = matrix)")
        expansion: float = Field(4.0, gt=0, description="hidden width of the memory MLP = expansion * head_dim")
        activation: activation_name = Field("silu", description="activation between the memory's layers")  # type: ignore[valid-type]
        residual: bool = Field(False, description="M(x) = x + f(x) instead of f(x)")
        output_norm: bool = Field(
            False,
            description="LayerNorm (no inner-loop-trained gain) on f's output: x + LN(f(x)) as in MIRAS/ATLAS",
        )
        chunk_size: int = Field(
            16,
            ge=1,
            description="tokens per chunk b: gradients inside a chunk are taken at the chunk-start weights",
        )
        retrieval: Literal["after", "before", "per_chunk"] = Field(
            "after",
            description="after: y_t = M_t(q_t); before: M_{t-1}(q_t); per_chunk: every query of a chunk reads the "
            "chunk-start weights (cheaper)",
        )
        init: Literal["learned", "zero"] = Field(
            "learned", description="initial memory weights M_0: learned by the outer loop, or fixed at zero"
        )
        out_proj: bool = Field(
            True, description="project the heads' outputs (heads * head_dim) back to the model width"
        )
        readout_norm: bool = Field(True, description="RMSNorm on the retrieved values before the output gate")
        checkpoint: bool = Field(
            False, description="recompute each chunk's intermediates in the backward pass (less memory, more time)"
        )
        output_gate: Literal["sigmoid", "silu", "none"] = Field(
            "sigmoid", description="gate the retrieved values by a projection of the input: y * gate(W x)"
        )

    class LRSpec(Section):
        max_lr: float = Field(
            0.5,
            gt=0,
            description="inner learning rate theta_t = max_lr * sigmoid(.); 0.5 bounds the delta-rule step "
            "beta = 2 theta at 1 for a matrix memory with unit keys",
        )
        gate: Granularity = Field("per_token", description=GRANULARITY_HELP)
        init: float = Field(0.1, gt=0, description="initial theta (sets the gate bias); 0 < init < max_lr")
        scale: Literal["none", "head_dim"] = Field(
            "none",
            description="none: theta as above (the paper's form); head_dim: theta divided by memory.head_dim d, as "
            "titans-pytorch, which averages its inner loss over the d features (max_lr and init are then per "
            "feature)",
        )

    class MomentumSpec(Section):
        enabled: bool = Field(True, description="keep a momentum ('past surprise') state S; off means eta = 0")
        rule: optimizer = Field(default_factory=lambda: {"name": "momentum"}, description="registered optimiser")  # type: ignore[valid-type]
        gate: Granularity = Field("per_token", description=GRANULARITY_HELP)
        init: float = Field(0.9, gt=0, lt=1, description="initial momentum decay eta in (0, 1)")
        form: Literal["paper", "ema"] = Field(
            "paper",
            description="paper: S = eta S - theta grad (eq. 14), one gradient moves the memory by theta / (1 - eta) "
            "in all, 10 theta at eta 0.9; ema: S = eta S - (1 - eta) theta grad, a moving average of the gradients "
            "whose cumulative step is theta whatever eta, so the stable range of theta hardly depends on eta "
            "(docs/stability.md)",
        )

    class ForgetSpec(Section):
        enabled: bool = Field(True, description="apply the forget gate alpha (weight decay of the memory)")
        rule: retention = Field(default_factory=lambda: {"name": "decay"}, description="registered retention rule")  # type: ignore[valid-type]
        gate: Granularity = Field("per_token", description=GRANULARITY_HELP)
        half_life: float = Field(
            2048.0,
            gt=0,
            description="initial forget rate as a half-life in tokens: alpha_0 = 1 - 2^(-1/half_life); long "
            "half-lives avoid the early collapse seen with alpha near 0.5",
        )

    class UpdateSpec(Section):
        loss: loss_rule = Field(default_factory=lambda: {"name": "l2"}, description="registered associative loss")  # type: ignore[valid-type]
        lr: LRSpec = Field(default_factory=LRSpec)
        momentum: Annotated[
            MomentumSpec, BeforeValidator(_toggle_shorthand, json_schema_input_type=bool | MomentumSpec)
        ] = Field(default_factory=MomentumSpec, description="momentum settings; `on`/`off` is shorthand for enabled")
        forget: Annotated[ForgetSpec, BeforeValidator(_toggle_shorthand, json_schema_input_type=bool | ForgetSpec)] = (
            Field(
                default_factory=ForgetSpec,
                description="forget-gate settings; `on`/`off` is shorthand for enabled",
            )
        )
        grad_clip: float | None = Field(
            None,
            gt=0,
            description="clip each token's inner gradient to this Frobenius norm over all layers (none = off)",
        )

    class ProjectionSpec(Section):
        activation: activation_name = Field("silu", description="activation after the q/k/v linear maps (paper: SiLU)")  # type: ignore[valid-type]
        conv_kernel: int | None = Field(
            4, ge=1, description="depthwise causal convolution over time on q, k, v (none = no convolution)"
        )
        qk_l2norm: bool = Field(True, description="l2-normalise queries and keys per head")

    class AttentionSpec(Section):
        kind: attention_kind = Field("sliding_window", description="registered attention kind")  # type: ignore[valid-type]
        heads: int = Field(4, ge=1, description="number of attention heads")
        head_dim: int | None = Field(None, ge=1, description="per-head width; none = dim / heads")
        window: int = Field(256, ge=1, description="sliding window: a query sees the last `window` tokens")
        rope: bool = Field(True, description="rotary position embedding on queries and keys")
        rope_theta: float = Field(10000.0, gt=0, description="RoPE base")

    section_models: dict[str, type[BaseModel]] = {
        "memory": MemorySpec,
        "update": UpdateSpec,
        "projections": ProjectionSpec,
        "persistent": PersistentSpec,
        "attention": AttentionSpec,
        "mac": MACSpec,
        "mag": MAGSpec,
        "mlp": MLPSpec,
        "norm": NormSpec,
    }

    block_models: dict[str, type[BaseModel]] = {}
    for entry in registry.entries("block"):
        fields: dict[str, Any] = {
            "kind": (Literal[entry.name], Field(description="block kind")),
            "repeat": (int, Field(1, ge=1, description="how many consecutive copies of this block")),
        }
        for section in entry.obj.sections:
            model = section_models[section]
            fields[section] = (model, Field(default_factory=model))
        block_models[entry.name] = create_model(
            f"Block_{entry.name}", __base__=Section, __doc__=entry.description or None, **fields
        )
    block = _tagged_union(registry, "block", "kind", block_models)

    top: dict[str, Any] = {
        "name": (
            SafeName | None,
            Field(None, description=f"a name for the model and its default output folders (build/<name>): {NAME_HELP}"),
        ),
        "description": (str | None, Field(None, description="free text")),
        "extends": (
            str | list[str] | None,
            Field(None, description="spec file(s) this one inherits from (paths relative to this file)"),
        ),
        "model": (ModelSection, Field(description="vocabulary and width")),
    }
    for section, model in section_models.items():
        top[section] = (model, Field(default_factory=model, description=f"model-wide {section} settings"))
    top["blocks"] = (
        list[block],
        Field(min_length=1, description="the layers, in order; each may override any model-wide section"),
    )
    spec = create_model(
        "Spec",
        __base__=Section,
        __doc__="A titans_compose model spec.",
        **top,
    )
    spec.section_models = section_models  # type: ignore[attr-defined]
    spec.block_models = block_models  # type: ignore[attr-defined]
    return spec


def spec_model(registry: Registry) -> type[BaseModel]:
    """The ``Spec`` model for ``registry`` in its current state, cached on the registry per version."""
    cached = registry.cache.get("spec_model")
    if cached is None or cached[0] != registry.version:
        cached = (registry.version, build_spec_model(registry))
        registry.cache["spec_model"] = cached
    return cached[1]
