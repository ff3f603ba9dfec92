"""YAML documents with a source map.

A :class:`SourceDoc` is plain data (dicts, lists, scalars) plus, for every value and every mapping key, the
file:line:col it was written at. Loading, `extends` inheritance, `--set` overrides and the per-block merge of
top-level sections all go through this type, so any error found later can point at the line the user wrote.

Only safe YAML is accepted: the document is composed with PyYAML's SafeLoader and only the standard scalar,
sequence and mapping tags are constructed; anything else is reported, never executed. Whatever makes a loader
recurse or explode is refused with a located TC108: nesting deeper than 64 levels (merge keys included), more than
100 000 values after aliases and merge keys are expanded ("billion laughs"), an alias or merge key inside its own
anchor, numbers longer than 100 characters, and scalars PyYAML cannot convert (a timestamp with month 13).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import yaml

from titans_compose.errors import Diagnostic, Location, SpecError

Path = tuple[str | int, ...]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAX_NODES = 100_000
_MAX_DEPTH = 64  # a spec nests about six levels; anything far deeper is a mistake or an attack
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
# a spec's numbers are short; a longer one is refused before it is converted (int() of 5000 digits raises, and a
# YAML 1.1 base-60 integer such as 1:2:3:... takes quadratic time to convert)
_MAX_NUMBER_CHARS = 100


@dataclass
class SourceDoc:
    """Plain data plus a flat source map from paths to the locations of values (and of mapping keys)."""

    data: Any
    locs: dict[Path, Location] = field(default_factory=dict)
    keylocs: dict[Path, Location] = field(default_factory=dict)

    def get(self, path: Path, default: Any = None) -> Any:
        node = self.data
        for part in path:
            if (isinstance(node, dict) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
            ):
                node = node[part]
            else:
                return default
        return node

    def location(self, path: Path, *, key: bool = False) -> Location | None:
        """The location of ``path``, or of its nearest written ancestor."""
        table = self.keylocs if key else self.locs
        if path in table:
            return table[path]
        for cut in range(len(path), -1, -1):
            prefix = path[:cut]
            if prefix in self.keylocs and cut < len(path):
                return self.keylocs[prefix]
            if prefix in self.locs:
                return self.locs[prefix]
        return None

    def subtree(self, path: Path) -> SourceDoc:
        """The value at ``path`` as a document of its own (paths rebased to the root)."""
        n = len(path)
        return SourceDoc(
            copy.deepcopy(self.get(path)),
            {p[n:]: loc for p, loc in self.locs.items() if p[:n] == path},
            {p[n:]: loc for p, loc in self.keylocs.items() if p[:n] == path and len(p) > n},
        )

    def copy(self) -> SourceDoc:
        return SourceDoc(copy.deepcopy(self.data), dict(self.locs), dict(self.keylocs))


def _under(path: Path, prefix: Path) -> bool:
    return path[: len(prefix)] == prefix


def _drop_under(table: dict[Path, Location], prefix: Path, *, keep_self: bool = False) -> None:
    for p in [p for p in table if _under(p, prefix) and (len(p) > len(prefix) or not keep_self)]:
        del table[p]


def merge(base: SourceDoc, over: SourceDoc) -> SourceDoc:
    """Deep-merge ``over`` onto ``base``: mappings merge key by key, anything else replaces. Locations follow."""
    out = base.copy()
    _merge_into(out, (), over)
    return out


def _merge_into(out: SourceDoc, path: Path, over: SourceDoc) -> None:
    value = over.get(path)
    current = out.get(path)
    if not (isinstance(value, dict) and isinstance(current, dict)):
        _replace(out, path, value, over.locs, over.keylocs)
        return
    if path in over.locs:
        out.locs[path] = over.locs[path]
    for key in value:
        child = (*path, key)
        if child in over.keylocs:
            out.keylocs[child] = over.keylocs[child]
        _merge_into(out, child, over)


def graft(doc: SourceDoc, path: Path, sub: SourceDoc) -> None:
    """Put ``sub`` at ``path`` of ``doc`` (whose parent must exist), replacing what was there."""
    rebased_locs = {(*path, *p): loc for p, loc in sub.locs.items()}
    rebased_keys = {(*path, *p): loc for p, loc in sub.keylocs.items()}
    _replace(doc, path, sub.data, rebased_locs, rebased_keys)


def _replace(out: SourceDoc, path: Path, value: Any, locs: dict[Path, Location], keylocs: dict[Path, Location]) -> None:
    """Replace the value at ``path`` and its locations by ``value`` with ``locs``/``keylocs`` (same coordinates)."""
    if path:
        out.get(path[:-1])[path[-1]] = copy.deepcopy(value)
    else:
        out.data = copy.deepcopy(value)
    _drop_under(out.locs, path)
    _drop_under(out.keylocs, path, keep_self=True)
    out.locs.update({p: loc for p, loc in locs.items() if _under(p, path)})
    out.keylocs.update({p: loc for p, loc in keylocs.items() if _under(p, path) and len(p) > len(path)})


def parse_yaml(text: str, file: str) -> SourceDoc:
    """Compose ``text`` safely and build a :class:`SourceDoc`; every problem becomes a :class:`SpecError`."""
    try:
        loader = yaml.SafeLoader(text)  # checks the characters at once: a control character fails here
    except yaml.YAMLError as exc:
        raise SpecError([_yaml_diagnostic(exc, file, text)]) from None
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise SpecError([_yaml_diagnostic(exc, file, text)]) from None
        except RecursionError:
            raise SpecError([_too_deep(Location(file))]) from None
        if node is None:
            return SourceDoc(None, {(): Location(file, 1, 1)})
        builder = _Builder(loader, file)
        data = builder.build(node, ())
        if builder.diagnostics:
            raise SpecError(builder.diagnostics)
        return SourceDoc(data, builder.locs, builder.keylocs)
    finally:
        loader.dispose()


def _yaml_diagnostic(exc: yaml.YAMLError, file: str, text: str) -> Diagnostic:
    """A TC102 diagnostic at the YAML error's mark (or, for a character YAML refuses, at that character)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    loc = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file)
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        loc = Location(file, before.count("\n") + 1, exc.position - (before.rfind("\n") + 1) + 1)
        return Diagnostic(
            "TC102",
            f"malformed YAML: {exc.reason} {exc.character!r}",
            location=loc,
            hint="YAML allows no control characters: remove it",
        )
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None) or ""
    if "single document" in context:
        problem = "the file holds more than one YAML document; a spec is exactly one document"
    return Diagnostic(
        "TC102",
        f"malformed YAML: {problem}",
        location=loc,
        hint="check indentation, colons after keys and matching quotes/brackets near this line",
    )


def _too_deep(where: Location, path: Path = ()) -> Diagnostic:
    return Diagnostic(
        "TC108",
        f"the document nests more than {_MAX_DEPTH} levels deep",
        dotted(path),
        where,
        "a spec is a few levels of mappings and lists; check for runaway brackets or indentation",
    )


class _Builder:
    """Walks a composed YAML node tree into plain data, recording locations and refusing unsafe constructs."""

    def __init__(self, loader: yaml.SafeLoader, file: str) -> None:
        self.loader = loader
        self.file = file
        self.locs: dict[Path, Location] = {}
        self.keylocs: dict[Path, Location] = {}
        self.diagnostics: list[Diagnostic] = []
        self.count = 0
        self.active: set[int] = set()

    def loc(self, node: yaml.Node) -> Location:
        return Location(self.file, node.start_mark.line + 1, node.start_mark.column + 1)

    def fail(self, code: str, message: str, node: yaml.Node, path: Path, hint: str = "") -> None:
        self.diagnostics.append(Diagnostic(code, message, dotted(path), self.loc(node), hint))

    def enter(self, node: yaml.Node, path: Path) -> bool:
        """Count ``node`` against the limits before it is built (as a value or merged into a mapping): False, with
        a diagnostic the first time a limit is passed, if it must be skipped."""
        self.count += 1
        if self.count > _MAX_NODES:
            if self.count == _MAX_NODES + 1:
                self.fail(
                    "TC108",
                    f"document expands to more than {_MAX_NODES} nodes",
                    node,
                    path,
                    "YAML aliases can multiply a document; a spec never needs this many values",
                )
            return False
        if len(self.active) >= _MAX_DEPTH:
            if not any(d.code == "TC108" and "nests" in d.message for d in self.diagnostics):
                self.diagnostics.append(_too_deep(self.loc(node), path[:_MAX_DEPTH]))
            return False
        if id(node) in self.active:
            self.fail("TC108", "recursive YAML alias", node, path, "an anchor may not be used inside itself")
            return False
        return True

    def build(self, node: yaml.Node, path: Path) -> Any:
        if not self.enter(node, path):
            return None
        self.locs[path] = self.loc(node)
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        self.active.add(id(node))
        try:
            sequence = isinstance(node, yaml.SequenceNode)
            if node.tag != (_SEQ_TAG if sequence else _MAP_TAG):
                self.fail(
                    "TC108", f"unsupported YAML tag {node.tag!r}", node, path, "specs use plain YAML: remove the tag"
                )
            if sequence:
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            return self.mapping(node, path)
        finally:
            self.active.discard(id(node))

    def scalar(self, node: yaml.ScalarNode, path: Path) -> Any:
        if node.tag in (_INT_TAG, _FLOAT_TAG) and len(node.value) > _MAX_NUMBER_CHARS:
            self.fail(
                "TC108",
                f"a number written with {len(node.value)} characters (at most {_MAX_NUMBER_CHARS})",
                node,
                path,
                "no setting needs this many digits: write it in exponent form (1.0e+9), or quote it if it is text",
            )
            return None
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError:
            self.fail(
                "TC108",
                f"unsupported YAML tag {node.tag!r}",
                node,
                path,
                "specs are data: tags that construct objects are never run; remove the tag",
            )
        except (ValueError, OverflowError) as exc:
            kind = node.tag.rsplit(":", 1)[-1]
            self.fail(
                "TC108",
                f"{node.value[:40]!r} looks like a {kind} but cannot be read as one: {exc}",
                node,
                path,
                "quote it if it is text",
            )
        return None

    def mapping(self, node: yaml.MappingNode, path: Path) -> dict:
        out: dict[str, Any] = {}
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for src in sources:
                    if not isinstance(src, yaml.MappingNode):
                        self.fail("TC108", "a YAML merge key (<<) needs a mapping", src, path)
                        continue
                    if not self.enter(src, path):
                        continue
                    self.active.add(id(src))
                    try:
                        for k, v in self.mapping(src, path).items():
                            merged.setdefault(k, v)
                    finally:
                        self.active.discard(id(src))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.fail("TC108", "mapping keys must be plain words, not lists or mappings", key_node, path)
                continue
            key = str(key_node.value)
            child = (*path, key)
            if key in out:
                self.fail(
                    "TC107",
                    f"duplicate key '{key}'",
                    key_node,
                    child,
                    f"'{key}' is already set at line {self.keylocs[child].line}; keep one of them",
                )
                continue
            self.keylocs[child] = self.loc(key_node)
            out[key] = self.build(value_node, child)
        for k, v in merged.items():
            out.setdefault(k, v)
        return out


def dotted(path: Path) -> str:
    """``("blocks", 0, "memory")`` -> ``"blocks.0.memory"``: the form used in messages and ``--set``."""
    return ".".join(str(p) for p in path)
