"""Parameter names of models written before a memory layer became one graph node, mapped to today's names.

Until then a memory layer was a set of nodes: ``proj_k``, ``conv_k``, ``memory.gates``, ``memory.state`` and one
read per use (``proj_q{s}``, ``conv_q{s}``, ``memory.readout_norm{s}``, ``memory.gate_proj{s}``,
``memory.out_proj{s}``, with ``s`` empty, ``_out`` or, for MAC's context read, ``_ctx``). Today the layer is the
node ``memory`` (a NeuralMemory) and MAC's context read the node ``memory.read_ctx``. Weights in the old names
(builds, exported artifacts, checkpoints) load through :func:`rename_legacy_keys`, run before ``load_state_dict``.
An optimizer's state follows the old order of the parameters, which the new module tree does not keep: resuming a
training checkpoint of the old layout is refused (:func:`has_legacy_keys` tells).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import Tensor

_READ = r"(?P<read>_out|_ctx)?"
#: old name within a layer (after ``nodes.L<i>__``) -> new name; ``{read}`` is the module of the read
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"proj_(?P<role>[kv])\.linear\.weight", r"memory.\g<role>_proj.weight"),
        (r"conv_(?P<role>[kv])\.conv\.weight", r"memory.convs.\g<role>.weight"),
        (r"memory__gates\.(?P<rest>.+)", r"memory.\g<rest>"),
        (r"memory__state\.(?P<rest>init_weights\..+)", r"memory.\g<rest>"),
        (rf"proj_q{_READ}\.linear\.weight", "{read}.q_proj.weight"),
        (rf"conv_q{_READ}\.conv\.weight", "{read}.convs.q.weight"),
        (rf"memory__readout_norm{_READ}\.gain", "{read}.readout_norm"),
        (rf"memory__gate_proj{_READ}\.linear\.weight", "{read}.gate_proj.weight"),
        (rf"memory__out_proj{_READ}\.linear\.weight", "{read}.out_proj.weight"),
    )
)
_LAYER = re.compile(r"nodes\.(?P<layer>L\d+__)(?P<rest>.+)")


def legacy_name(rest: str) -> str | None:
    """Today's name, within a layer, of the old parameter name ``rest``; None if it was not renamed."""
    for pattern, replacement in _RULES:
        match = pattern.fullmatch(rest)
        if match is not None:
            module = "memory__read_ctx" if match.groupdict().get("read") == "_ctx" else "memory"
            return match.expand(replacement.replace("{read}", module))
    return None


def has_legacy_keys(names: Iterable[str]) -> bool:
    """Whether any of the parameter ``names`` (a TitansLM's, without a prefix) is an old memory name."""
    return any((m := _LAYER.fullmatch(name)) is not None and legacy_name(m["rest"]) is not None for name in names)


def rename_legacy_keys(module: Any, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """A ``load_state_dict`` pre-hook of :class:`~titans_compose.nn.model.TitansLM`: rename, in place, the old
    memory parameter names of ``state_dict`` (under ``prefix``) to today's."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        match = _LAYER.fullmatch(key[len(prefix) :])
        new = None if match is None else legacy_name(match["rest"])
        if new is not None:
            state_dict[f"{prefix}nodes.{match['layer']}{new}"] = state_dict.pop(key)
