"""One generic registry for every pluggable part: memory models, losses, retention (forget) rules, optimisers
(momentum), activations, block kinds and attention kinds.

Entries are registered explicitly (built-ins in :mod:`titans_compose.registry.builtins`, plug-ins through their
``register(registry)`` function). A name may be registered once per kind; a clash is an error, never a silent
override. An activation's or loss's Triton expressions are checked against its torch forms as it is registered
(:mod:`titans_compose.registry.expressions`; deferred to its first lookup while torch is not imported). Each entry
may carry a pydantic ``params`` model: its fields become the entry's spec options, appear in the JSON schema and in
``titans-compose ls``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from titans_compose.errors import Diagnostic, SpecError, did_you_mean
from titans_compose.registry import expressions

KINDS: dict[str, str] = {
    "memory": "neural memory models (the network trained at test time)",
    "loss": "associative losses l(M(k), v) of the inner loop (the MIRAS 'attentional bias')",
    "retention": "retention / forget rules applied to the memory weights each step",
    "optimizer": "inner-loop optimisers (how gradients accumulate into the update, e.g. momentum)",
    "activation": "elementwise activations (inside the memory MLP and on projections)",
    "block": "block kinds: how memory, attention and persistent tokens are wired in one layer",
    "attention": "attention kinds (which keys each query may see)",
}


class RuleParams(BaseModel):
    """Base for an entry's spec options: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass(frozen=True)
class Entry:
    """A registered name: what it is (``obj``), its options (``params``), a one-line description and where it
    came from (``builtin``, a plug-in's name, or a file)."""

    kind: str
    name: str
    obj: Any
    params: type[RuleParams] | None
    description: str
    source: str

    def param_summary(self) -> str:
        """``name=default`` for each option, for listings."""
        if self.params is None or not self.params.model_fields:
            return ""
        parts = []
        for fname, info in self.params.model_fields.items():
            default = "required" if info.is_required() else repr(info.default)
            parts.append(f"{fname}={default}")
        return ", ".join(parts)


class Registry:
    """Names per kind. ``version`` increases on every change; ``cache`` holds things derived from the entries
    (such as the spec model), each stored with the version it was built for."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._source = "builtin"
        self.version = 0
        self.cache: dict[str, tuple[int, Any]] = {}
        self._unchecked: set[tuple[str, str]] = set()  # rules whose Triton expressions await torch

    def register(
        self,
        kind: str,
        name: str,
        obj: Any,
        *,
        params: type[RuleParams] | None = None,
        description: str = "",
    ) -> Entry:
        """Add ``name`` under ``kind``. Raises :class:`SpecError` (TC503/TC502) for an unknown kind or a clash, and
        (TC504) for an activation or loss whose Triton expressions disagree with its torch forms."""
        if kind not in self._entries:
            raise SpecError([Diagnostic("TC503", f"unknown registry kind '{kind}'", hint=did_you_mean(kind, KINDS))])
        if not isinstance(name, str) or not name.isidentifier():
            raise SpecError(
                [Diagnostic("TC502", f"registry names must be identifiers, got {name!r} for kind '{kind}'")]
            )
        existing = self._entries[kind].get(name)
        if existing is not None:
            raise SpecError(
                [
                    Diagnostic(
                        "TC502",
                        f"{kind} '{name}' is already registered by {existing.source}",
                        hint="pick another name; registered names are never silently replaced",
                    )
                ]
            )
        if params is not None and not (isinstance(params, type) and issubclass(params, RuleParams)):
            raise SpecError([Diagnostic("TC502", f"params of {kind} '{name}' must subclass titans_compose.RuleParams")])
        deferred = kind in expressions.FIELDS and not expressions.torch_ready()
        if kind in expressions.FIELDS and not deferred:
            expressions.check(kind, name, obj, params)
        entry = Entry(kind, name, obj, params, description, self._source)
        self._entries[kind][name] = entry
        if deferred:
            self._unchecked.add((kind, name))
        self.version += 1
        return entry

    def get(self, kind: str, name: str) -> Entry:
        """The entry, or a :class:`SpecError` (TC205) with a did-you-mean hint; TC504 for a rule registered before
        torch was imported whose Triton expressions disagree with its torch forms."""
        try:
            entry = self._entries[kind][name]
        except KeyError:
            if kind not in self._entries:
                raise SpecError([Diagnostic("TC503", f"unknown registry kind '{kind}'")]) from None
            raise SpecError(
                [
                    Diagnostic(
                        "TC205",
                        f"unknown {kind} '{name}'",
                        hint=did_you_mean(name, list(self._entries[kind])),
                    )
                ]
            ) from None
        if (kind, name) in self._unchecked and expressions.torch_ready():
            expressions.check(kind, name, entry.obj, entry.params)
            self._unchecked.discard((kind, name))
        return entry

    def names(self, kind: str) -> list[str]:
        return list(self._entries[kind])

    def entries(self, kind: str | None = None) -> list[Entry]:
        kinds = [kind] if kind is not None else list(self._entries)
        return [e for k in kinds for e in self._entries[k].values()]

    @contextlib.contextmanager
    def transaction(self, source: str) -> Iterator[None]:
        """Attribute registrations to ``source``; if the block raises, undo every registration it made."""
        saved = {kind: dict(entries) for kind, entries in self._entries.items()}
        saved_unchecked = set(self._unchecked)
        saved_version, saved_source = self.version, self._source
        self._source = source
        try:
            yield
        except BaseException:
            self._entries = saved
            self._unchecked = saved_unchecked
            self.version = saved_version + 1
            raise
        finally:
            self._source = saved_source
