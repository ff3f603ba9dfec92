"""Loading a spec file into a :class:`SourceDoc`: reading, ``extends`` inheritance, ``--set`` overrides, and the
merge of model-wide sections into each block.

Inheritance: ``extends: base.yaml`` (or a list, merged left to right) is resolved relative to the file that
names it; the child is deep-merged over its parents (mappings merge key by key, lists and scalars replace).
Overrides: ``path=value`` with a dotted path (list items by index, ``blocks.0.kind=mag``) and a YAML value.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from titans_compose.errors import Diagnostic, Location, SpecError
from titans_compose.io import UnreadableFile, read_bounded
from titans_compose.spec.source import SourceDoc, dotted, graft, merge, parse_yaml

_MAX_BYTES = 4 * 1024 * 1024

#: an override ``path=value``, alone (located at ``--set path=value``) or with the location it was written at
Override = str | tuple[str, Location]


def read_spec_file(path: str | os.PathLike[str], what: str = "spec") -> SourceDoc:
    """Read and parse one YAML file (no inheritance), a ``what`` (spec or sweep) in messages. The top level must be
    a mapping. Only a regular file is read, and at most 4 MiB of it: a device, a pipe, a directory (or a symlink to
    one) or a larger file is refused."""
    name = str(path)
    try:
        text = read_bounded(path, _MAX_BYTES, what).decode("utf-8")
    except UnreadableFile as exc:
        raise SpecError([Diagnostic("TC101", str(exc), location=Location(name))]) from None
    except FileNotFoundError:
        raise SpecError(
            [
                Diagnostic(
                    "TC101",
                    f"{what} file not found: {name}",
                    location=Location(name),
                    hint="check the path; relative paths are taken from the current directory",
                )
            ]
        ) from None
    except UnicodeDecodeError as exc:
        raise SpecError(
            [
                Diagnostic(
                    "TC101",
                    f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                    location=Location(name),
                )
            ]
        ) from None
    except OSError as exc:
        raise SpecError(
            [Diagnostic("TC101", f"cannot read {name}: {exc.strerror or exc}", location=Location(name))]
        ) from None
    doc = parse_yaml(text, name)
    if not isinstance(doc.data, dict):
        kind = "empty" if doc.data is None else f"a {_yaml_type(doc.data)}"
        raise SpecError(
            [
                Diagnostic(
                    "TC103",
                    f"the top level of a {what} must be a mapping, but this file is {kind}",
                    location=doc.location(()) or Location(name, 1, 1),
                    hint="a spec starts with keys such as `model:` and `blocks:`" if what == "spec" else "",
                )
            ]
        )
    return doc


def _yaml_type(value: object) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "scalar")


def load_document(path: str | os.PathLike[str], overrides: Sequence[Override] = ()) -> SourceDoc:
    """Read ``path`` with its ``extends`` chain resolved, then apply ``overrides`` (``a.b=value``, or a pair of it
    and the location it was written at, e.g. a line of a sweep file)."""
    doc = _load_with_parents(Path(path), str(path), (), {})
    _refuse_sweep_file(doc, str(path))
    problems: list[Diagnostic] = []
    for override in overrides:
        arg, where = (override, None) if isinstance(override, str) else override
        try:
            apply_override(doc, arg, where)
        except SpecError as exc:
            problems.extend(exc.diagnostics)
    if problems:
        raise SpecError(problems)
    return doc


def _refuse_sweep_file(doc: SourceDoc, name: str) -> None:
    """A sweep file given where a spec belongs (its ``base:`` and no ``model:`` or ``blocks:``) is named as one,
    instead of failing key by key."""
    if "base" in doc.data and not {"model", "blocks"} & doc.data.keys():
        raise SpecError(
            [
                Diagnostic(
                    "TC109",
                    f"{name} is a sweep file (it has `base:` and no `model:` or `blocks:`), not a spec",
                    "base",
                    doc.location(("base",), key=True),
                    f"run it with `titans-compose sweep {name}` (add --dry-run to only validate its points)",
                )
            ]
        )


def _load_with_parents(path: Path, shown: str, chain: tuple[Path, ...], loaded: dict[Path, SourceDoc]) -> SourceDoc:
    """``path`` merged over its ``extends`` chain. ``chain`` holds the files that extend it (a cycle is TC104);
    ``loaded`` memoises the files done in this load by resolved path, so a parent shared by several files (a
    diamond) is read and merged once, however many paths reach it."""
    real = Path(os.path.realpath(path))  # not resolve(), which raises on a symlink loop: the read reports it
    if real in loaded:
        return loaded[real]
    doc = read_spec_file(shown)
    parents = doc.data.pop("extends", None)
    extends_loc = doc.location(("extends",))
    doc.locs.pop(("extends",), None)
    doc.keylocs.pop(("extends",), None)
    for p in [p for p in doc.locs if p[:1] == ("extends",)]:
        del doc.locs[p]
    if parents is None:
        loaded[real] = doc
        return doc
    if isinstance(parents, str):
        parents = [parents]
    if (
        not isinstance(parents, list)
        or not parents
        or not all(isinstance(p, str) and p and "\0" not in p for p in parents)
    ):
        raise SpecError(
            [
                Diagnostic(
                    "TC105",
                    "`extends` must be a file path or a list of file paths",
                    "extends",
                    extends_loc,
                    hint="e.g. `extends: base.yaml` (relative to this file)",
                )
            ]
        )
    base: SourceDoc | None = None
    for parent in parents:
        target = path.parent / parent
        shown_target = os.path.normpath(os.path.join(os.path.dirname(shown), parent))
        resolved = Path(os.path.realpath(target))
        if resolved in (*chain, real):
            cycle = " -> ".join(str(c) for c in (*chain, real, resolved))
            raise SpecError(
                [
                    Diagnostic(
                        "TC104",
                        f"`extends` cycle: {cycle}",
                        "extends",
                        extends_loc,
                        hint="a spec may not inherit from itself, directly or through its parents",
                    )
                ]
            )
        if not target.exists():
            raise SpecError(
                [
                    Diagnostic(
                        "TC105",
                        f"`extends` target not found: {shown_target}",
                        "extends",
                        extends_loc,
                        hint="paths in `extends` are relative to the file that names them",
                    )
                ]
            )
        parent_doc = _load_with_parents(target, shown_target, (*chain, real), loaded)
        base = parent_doc if base is None else merge(base, parent_doc)
    assert base is not None
    loaded[real] = merge(base, doc)
    return loaded[real]


def parse_override(arg: str, where: Location | None = None) -> tuple[tuple[str | int, ...], object]:
    """``"memory.depth=3"`` -> ``(("memory", "depth"), 3)``; the value is parsed as YAML (safely). Problems are
    located at ``where`` (default: the ``--set`` argument itself)."""
    where = where or Location(f"--set {arg}")
    key, sep, raw = arg.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise SpecError(
            [
                Diagnostic(
                    "TC106",
                    f"bad override {arg!r}: expected path=value",
                    location=where,
                    hint="e.g. --set memory.depth=3 or --set blocks.0.kind=mag",
                )
            ]
        )
    try:  # as safely as a file, within the same limits (nesting, aliases, number lengths)
        value = parse_yaml(raw, str(where)).data if raw.strip() else None
    except SpecError as exc:
        problem = "; ".join(d.message.removeprefix("malformed YAML: ") for d in exc.diagnostics)
        raise SpecError(
            [
                Diagnostic(
                    "TC106",
                    f"bad override value {raw!r}: {problem}",
                    key,
                    where,
                    hint="the value is read as YAML: quote strings with special characters",
                )
            ]
        ) from None
    path = tuple(int(p) if p.isdigit() else p for p in parts)
    return path, value


def apply_override(doc: SourceDoc, arg: str, where: Location | None = None) -> None:
    """Set one ``path=value`` override in ``doc``, creating mappings on the way; list items must exist. The value
    and any problem are located at ``where`` (default: the ``--set`` argument itself)."""
    where = where or Location(f"--set {arg}")
    path, value = parse_override(arg, where)
    if path[0] == "extends":
        raise SpecError(
            [
                Diagnostic(
                    "TC106",
                    "`extends` cannot be overridden: inheritance is resolved before --set applies",
                    "extends",
                    where,
                    "edit the file's `extends:` instead",
                )
            ]
        )
    node = doc.data
    for depth, part in enumerate(path[:-1]):
        nxt = path[depth + 1]
        if isinstance(node, list):
            if not isinstance(part, int) or not 0 <= part < len(node):
                raise SpecError(
                    [
                        Diagnostic(
                            "TC106",
                            f"no item {part} in the list at {dotted(path[:depth]) or '.'} (it has {len(node)})",
                            dotted(path),
                            where,
                        )
                    ]
                )
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise SpecError([Diagnostic("TC106", f"{dotted(path[:depth])} is not a mapping", dotted(path), where)])
        if part in node and node[part] is not None and not isinstance(node[part], dict | list):
            raise SpecError(
                [
                    Diagnostic(
                        "TC106",
                        f"{dotted(path[: depth + 1])} is a {_yaml_type(node[part])}, so it has no '{nxt}'",
                        dotted(path),
                        where,
                        hint=f"set {dotted(path[: depth + 1])} itself, or check the path",
                    )
                ]
            )
        if node.get(part) is None:
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or not 0 <= last < len(node):
            raise SpecError(
                [Diagnostic("TC106", f"no item {last} in the list at {dotted(path[:-1])}", dotted(path), where)]
            )
    elif not isinstance(node, dict):
        raise SpecError([Diagnostic("TC106", f"{dotted(path[:-1])} is not a mapping", dotted(path), where)])
    graft(doc, path, SourceDoc(value, {(): where}, {}))
    doc.keylocs[path] = where


def resolve_blocks(doc: SourceDoc, section_names: dict[str, tuple[str, ...]]) -> SourceDoc:
    """Merge the model-wide sections into every block that takes them (block values win).

    ``section_names`` maps each registered block kind to the sections it takes; blocks of unknown kind are left
    as written for validation to report.
    """
    out = doc.copy()
    blocks = out.data.get("blocks")
    if not isinstance(blocks, list):
        return out
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or not isinstance(block.get("kind"), str) or block["kind"] not in section_names:
            continue
        for section in section_names[block["kind"]]:
            top = doc.data.get(section)
            if top is None:
                continue
            merged = doc.subtree((section,))
            if section in block:
                merged = merge(merged, doc.subtree(("blocks", i, section)))
            graft(out, ("blocks", i, section), merged)
            out.keylocs.setdefault(("blocks", i, section), doc.location((section,), key=True))
    return out
