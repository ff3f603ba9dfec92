"""Diagnostics: every problem titans_compose reports about a spec, with a stable code and a source location.

A :class:`Diagnostic` renders as ``file:line:col: dotted.path: message [CODE]`` followed by an optional hint line,
so editors and CI logs can jump to the place. :class:`SpecError` carries all diagnostics of one failed load, so a
user sees every problem at once instead of fixing them one by one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Stable error codes. Codes are never reused for a different meaning; tests and users may match on them.
CODES: dict[str, str] = {
    # loading (TC1xx)
    "TC101": "file not found or unreadable",
    "TC102": "malformed YAML",
    "TC103": "top level is not a mapping",
    "TC104": "`extends` cycle",
    "TC105": "bad `extends` value or target",
    "TC106": "bad --set override",
    "TC107": "duplicate key in a mapping",
    "TC108": "unsupported YAML tag or construct",
    "TC109": "a sweep file where a spec was expected",
    # schema (TC2xx)
    "TC201": "unknown key",
    "TC202": "missing required field",
    "TC203": "wrong type",
    "TC204": "value out of range",
    "TC205": "unknown registered name",
    "TC206": "invalid choice",
    "TC207": "invalid value",
    "TC208": "name is not a safe file name",
    # cross-field rules (TC3xx)
    "TC301": "attention heads do not divide the model width",
    "TC302": "MAC segment is not a multiple of the memory chunk size",
    "TC303": "learning-rate gate initial value out of range",
    "TC304": "MAC order is not a permutation of persistent, memory, segment",
    "TC305": "memory width does not match the model width",
    "TC306": "model size beyond the limit (parameters or activations per token), or a bad limit setting",
    "TC307": "too many layers",
    "TC308": "too many sweep points",
    # graph passes (TC4xx)
    "TC401": "cycle through non-recurrent edges",
    "TC402": "node unreachable from the input or not reaching the output",
    "TC403": "shape mismatch",
    "TC404": "wrong wiring for the block's variant",
    "TC405": "graph pass crashed",
    "TC406": "unknown memory backend requested",
    # registry and plug-ins (TC5xx)
    "TC501": "plug-in failed to load",
    "TC502": "duplicate registered name",
    "TC503": "unknown registry kind",
    "TC504": "a rule's Triton expression disagrees with its torch form",
    # warnings (TCW)
    "TCW01": "setting has no effect",
    "TCW02": "setting is likely to hurt training",
    "TCW03": "setting breaks causality",
    "TCW04": "inner update can diverge",
}


@dataclass(frozen=True, order=True)
class Location:
    """A place in a source: a file (or a pseudo-source such as ``--set``), 1-based line and column."""

    file: str
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        if self.line <= 0:
            return self.file
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Diagnostic:
    """One problem (or warning) with its stable code, the dotted spec path, a location and a hint."""

    code: str
    message: str
    path: str = ""
    location: Location | None = None
    hint: str = ""
    severity: str = "error"
    stage: str = ""  # e.g. the graph pass that found it

    def render(self) -> str:
        """One line per diagnostic (user text with line breaks is escaped), then the hint."""
        where = f"{self.location}: " if self.location is not None else ""
        path = f"{_one_line(self.path)}: " if self.path else ""
        stage = f" (pass: {self.stage})" if self.stage else ""
        kind = "" if self.severity == "error" else f"{self.severity}: "
        text = f"{where}{path}{kind}{_one_line(self.message)} [{self.code}]{stage}"
        if self.hint:
            text += f"\n    hint: {_one_line(self.hint)}"
        return text

    def sort_key(self) -> tuple:
        loc = self.location or Location("")
        return (loc.file, loc.line, loc.col, self.path, self.code)


@dataclass
class SpecError(Exception):
    """Raised when a spec cannot be loaded, validated or lowered; carries every diagnostic found."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.render())

    @property
    def codes(self) -> list[str]:
        return [d.code for d in self.diagnostics]

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)

    def __str__(self) -> str:
        return self.render()


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def dedupe(diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
    """Drop repeats of the same problem at the same place (a top-level default seen through several blocks),
    keeping the shortest path, and sort by location."""
    best: dict[tuple, Diagnostic] = {}
    for d in diagnostics:
        key = (d.code, d.message, d.location, d.severity, d.stage)
        kept = best.get(key)
        if kept is None or len(d.path) < len(kept.path):
            best[key] = d
    return sorted(best.values(), key=Diagnostic.sort_key)


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """A 'did you mean' hint for a misspelt name, or a list of valid names when nothing is close."""
    candidates = sorted(set(candidates))
    close = difflib.get_close_matches(str(word), candidates, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    if len(candidates) <= 20:
        return "valid: " + ", ".join(candidates)
    return "valid: " + ", ".join(candidates[:20]) + f", ... ({len(candidates)} in all)"
