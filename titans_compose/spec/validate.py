"""Validation: a resolved :class:`SourceDoc` -> a typed spec, or every problem at once as located diagnostics.

pydantic finds field-level problems; cross-field rules (:mod:`titans_compose.spec.checks`) run on every block that
is valid on its own, so a spec with a typo in one block still gets its other blocks checked.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from titans_compose.errors import Diagnostic, Location, SpecError, dedupe, did_you_mean
from titans_compose.registry.core import Registry
from titans_compose.spec.checks import check_block
from titans_compose.spec.models import spec_model
from titans_compose.spec.size import check_size
from titans_compose.spec.source import Path, SourceDoc, dotted

_TAGS = ("kind", "name")
_RANGE = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "too_short",
    "too_long",
    "multiple_of",
    "finite_number",
}


@dataclass
class LoadedSpec:
    """A validated spec with its source map: ``spec`` is the typed model, ``doc`` the resolved document."""

    spec: Any
    doc: SourceDoc
    source: str
    registry: Registry
    warnings: list[Diagnostic] = field(default_factory=list)

    def location(self, path: str) -> Location | None:
        """Where the dotted ``path`` (e.g. ``blocks.0.memory``) was written, or its nearest written ancestor."""
        parts = tuple(int(p) if p.isdigit() else p for p in path.split(".")) if path else ()
        return self.doc.location(parts, key=True) or self.doc.location(parts)

    def resolved_yaml(self) -> str:
        """The fully resolved spec (every default filled in) as YAML, with a header naming its source."""
        import yaml

        data = self.spec.model_dump(mode="json", exclude={"extends"})
        header = f"# {self.source} fully resolved by titans-compose (every default shown)\n"
        return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def validate_document(doc: SourceDoc, registry: Registry, source: str) -> LoadedSpec:
    """Validate a resolved document; raise :class:`SpecError` with all diagnostics if anything is wrong."""
    model = spec_model(registry)
    problems: list[Diagnostic] = []
    spec = None
    try:
        spec = model.model_validate(doc.data)
    except ValidationError as exc:
        problems.extend(pydantic_diagnostic(err, doc, model) for err in exc.errors())
    problems.extend(_cross_field(spec, doc, model))
    if spec is not None:
        problems.extend(check_size(spec, doc, registry))
    problems = [_as_written(d, doc) for d in problems]
    errors = [d for d in problems if d.severity == "error"]
    if errors:
        raise SpecError(dedupe(problems))
    return LoadedSpec(spec, doc, source, registry, dedupe(d for d in problems if d.severity != "error"))


def _as_written(diag: Diagnostic, doc: SourceDoc) -> Diagnostic:
    """Report a value a block inherited from a model-wide section under the path the user wrote it at
    (``memory.depth``, not ``blocks.2.memory.depth``)."""
    parts = diag.path.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return diag
    written = tuple(parts[2:])
    if diag.location is None or doc.location(written) != diag.location:
        return diag
    return replace(diag, path=".".join(written))


def _cross_field(spec: Any, doc: SourceDoc, model: Any) -> list[Diagnostic]:
    """Cross-field rules for every block. When the spec as a whole is invalid, each block's sections are validated
    one by one and a rule runs if the sections it reads are valid, so its findings join the field errors."""
    if spec is not None:
        pairs = list(enumerate(spec.blocks))
        top = spec.model
    else:
        try:
            top = model.model_fields["model"].annotation.model_validate(doc.data.get("model"))
        except ValidationError:
            return []
        pairs = []
        blocks = doc.data.get("blocks")
        for i, raw in enumerate(blocks if isinstance(blocks, list) else []):
            if isinstance(raw, dict) and isinstance(raw.get("kind"), str) and raw["kind"] in model.block_models:
                taken = [name for name in model.block_models[raw["kind"]].model_fields if name in model.section_models]
                pairs.append((i, _valid_sections(raw, {name: model.section_models[name] for name in taken})))
    out = []
    for i, block in pairs:
        for finding in check_block(block, top):
            path = ("blocks", i, *finding.path)
            out.append(
                Diagnostic(
                    finding.code, finding.message, dotted(path), doc.location(path), finding.hint, finding.severity
                )
            )
    return out


def _valid_sections(raw: dict, section_models: dict[str, type[BaseModel]]) -> SimpleNamespace:
    """The sections a block takes, each validated on its own (unwritten ones at their defaults; invalid ones None)."""
    sections = {}
    for name, section_model in section_models.items():
        try:
            sections[name] = section_model.model_validate(raw.get(name, {}))
        except ValidationError:
            sections[name] = None
    return SimpleNamespace(**sections)


def pydantic_diagnostic(err: dict, doc: SourceDoc, model: type[BaseModel]) -> Diagnostic:
    """One pydantic error of validating ``doc.data`` against ``model`` as a located diagnostic (any model whose
    unknown keys are errors: the spec, or a sweep file)."""
    path, leaf = _normalise(doc.data, err["loc"])
    kind = err["type"]
    ctx = err.get("ctx") or {}
    field_info = _field_info(model, doc.data, path)
    description = getattr(field_info, "description", None) or ""
    full = (*path, leaf) if leaf is not None else path
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, doc.data, path[:-1])
        key = str(path[-1]) if path else "?"
        return Diagnostic(
            "TC201",
            f"unknown key '{key}'",
            dotted(path),
            doc.location(path, key=True),
            did_you_mean(key, allowed) if allowed else "remove it",
        )
    if kind == "missing":
        return Diagnostic(
            "TC202",
            f"missing required field '{full[-1]}'",
            dotted(full),
            doc.location(path, key=True) or doc.location(path),
            description,
        )
    if kind == "union_tag_not_found":
        tag = ctx.get("discriminator", "'kind'").strip("'")
        names = _tag_values(_walk(model, doc.data, path)[2], tag)
        return Diagnostic(
            "TC202",
            f"missing required field '{tag}'",
            dotted((*path, tag)),
            doc.location(path),
            f"add `{tag}:` with one of: {', '.join(names)}",
        )
    if kind.startswith("TC"):
        hint = ctx.get("hint", description) if kind == "TC205" else description
        node = doc.get(path)
        tag = next((t for t in _TAGS if isinstance(node, dict) and t in node and node[t] == ctx.get("value")), None)
        if tag is not None:
            path = (*path, tag)
        return Diagnostic(kind, err["msg"], dotted(path), doc.location(path), hint)
    if kind == "union_tag_invalid":
        tags = re.findall(r"'([^']*)'", ctx.get("expected_tags", ""))
        disc = ctx.get("discriminator", "").strip("'")
        return Diagnostic(
            "TC205",
            f"unknown {disc} '{ctx.get('tag')}'",
            dotted((*path, disc)),
            doc.location((*path, disc)) or doc.location(path),
            did_you_mean(str(ctx.get("tag")), tags),
        )
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        got = err.get("input")
        return Diagnostic(
            "TC206",
            f"invalid choice {got!r}: {err['msg'].lower()}",
            dotted(path),
            doc.location(path),
            did_you_mean(str(got), choices),
        )
    if kind in _RANGE:
        return Diagnostic(
            "TC204", f"{err['msg']} (got {err.get('input')!r})", dotted(path), doc.location(path), description
        )
    if kind.endswith(("_type", "_parsing")) or kind in {"is_instance_of", "model_attributes_type"}:
        return Diagnostic(
            "TC203",
            f"{err['msg']}, got {_describe(err.get('input'))}",
            dotted(path),
            doc.location(path),
            description,
        )
    return Diagnostic("TC207", err["msg"], dotted(path), doc.location(path), description)


def _describe(value: Any) -> str:
    names = {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "nothing (null)",
    }
    text = names.get(type(value), type(value).__name__)
    if isinstance(value, str | bool | int | float):
        text += f" ({value!r})"
    return text


def _normalise(data: Any, loc: tuple) -> tuple[Path, str | None]:
    """Map a pydantic error location onto the document: drop union tags and validator names.
    Returns the path that exists in ``data`` and, for a missing key, that key."""
    path: list[str | int] = []
    node = data
    tag_skipped = False  # a union's tag appears once, right after the union's own position
    for idx, el in enumerate(loc):
        last = idx == len(loc) - 1
        if isinstance(node, dict):
            tags = [node.get(t) for t in _TAGS if isinstance(node.get(t), str)]
            if isinstance(el, str) and not last and not tag_skipped and el in tags:
                tag_skipped = True
                continue
            tag_skipped = False
            if el in node:
                path.append(el)
                node = node[el]
                continue
            if last:
                return tuple(path), str(el)
            continue
        if isinstance(node, list) and isinstance(el, int) and 0 <= el < len(node):
            path.append(el)
            node = node[el]
            tag_skipped = False
            continue
        break
    return tuple(path), None


def _unwrap(tp: Any, data: Any) -> Any:
    """Strip Annotated / Optional; pick the union member a tagged value selects."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(tp) if isinstance(a, type) and issubclass(a, BaseModel)]
            if not members:
                return tp
            tp = members[0]
            if isinstance(data, dict):
                for m in members:
                    for tag in _TAGS:
                        f = m.model_fields.get(tag)
                        if f is not None and data.get(tag) in get_args(f.annotation):
                            tp = m
        else:
            return tp


def _walk(model: type[BaseModel], data: Any, path: Path) -> tuple[Any, Any, Any]:
    """(type, FieldInfo, annotation as written) at ``path``; Nones where the path leaves the models."""
    tp: Any = model
    raw: Any = model
    info = None
    node = data
    for el in path:
        tp = _unwrap(tp, node)
        if isinstance(el, int):
            if get_origin(tp) is not list:
                return None, None, None
            tp = raw = get_args(tp)[0]
            node = node[el] if isinstance(node, list) and el < len(node) else None
            continue
        if not (isinstance(tp, type) and issubclass(tp, BaseModel)) or el not in tp.model_fields:
            return None, None, None
        info = tp.model_fields[el]
        tp = raw = info.annotation
        node = node.get(el) if isinstance(node, dict) else None
    return _unwrap(tp, node), info, raw


def _tag_values(tp: Any, tag: str) -> list[str]:
    """The tag values of every model member of a (possibly annotated) union type."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _tag_values(get_args(tp)[0], tag)
    if origin in (Union, types.UnionType):
        return [v for member in get_args(tp) for v in _tag_values(member, tag)]
    if isinstance(tp, type) and issubclass(tp, BaseModel) and tag in tp.model_fields:
        return [str(v) for v in get_args(tp.model_fields[tag].annotation)]
    return []


def _field_info(model: type[BaseModel], data: Any, path: Path) -> Any:
    return _walk(model, data, path)[1]


def _allowed_keys(model: type[BaseModel], data: Any, path: Path) -> list[str]:
    tp = _walk(model, data, path)[0]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []
