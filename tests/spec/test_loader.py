"""Loading: source locations, `extends` inheritance, `--set` overrides, block-section merging, safe YAML."""

from __future__ import annotations

import textwrap

import pytest

from titans_compose.errors import SpecError
from titans_compose.registry import new_registry
from titans_compose.spec import load_spec
from titans_compose.spec.loader import load_document, parse_override
from titans_compose.spec.source import SourceDoc, merge, parse_yaml

BASE = """\
model:
  vocab_size: 256
  dim: 64
memory:
  heads: 2
  head_dim: 32
  chunk_size: 8
mac:
  segment: 32
blocks:
  - kind: mac
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def codes(exc: SpecError) -> list[str]:
    return [d.code for d in exc.diagnostics]


def test_locations_of_values_and_keys():
    doc = parse_yaml("a:\n  b: 1\n  c: [x, y]\n", "f.yaml")
    assert doc.data == {"a": {"b": 1, "c": ["x", "y"]}}
    assert str(doc.locs[("a", "b")]) == "f.yaml:2:6"
    assert str(doc.keylocs[("a", "b")]) == "f.yaml:2:3"
    assert str(doc.locs[("a", "c", 1)]) == "f.yaml:3:10"
    # a missing path falls back to its nearest written ancestor's key
    assert str(doc.location(("a", "zzz"))) == "f.yaml:1:1"


def test_merge_keeps_the_winning_values_location():
    base = parse_yaml("a: {b: 1, c: 2}\nl: [1, 2]\n", "base.yaml")
    over = parse_yaml("a:\n  c: 3\nl: [9]\n", "child.yaml")
    merged = merge(base, over)
    assert merged.data == {"a": {"b": 1, "c": 3}, "l": [9]}
    assert merged.locs[("a", "b")].file == "base.yaml"
    assert merged.locs[("a", "c")].file == "child.yaml"
    assert ("l", 1) not in merged.locs  # the replaced list's old items are gone


def test_extends_merges_and_errors_point_into_the_right_file(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(
        tmp_path,
        "child.yaml",
        """\
        extends: base.yaml
        memory:
          depth: 1
        """,
    )
    loaded = load_spec(child, registry=new_registry())
    memory = loaded.spec.blocks[0].memory
    assert (memory.depth, memory.heads, memory.head_dim) == (1, 2, 32)
    bad = write(tmp_path, "bad.yaml", "extends: base.yaml\nmemory:\n  chunk_size: 5\n")
    with pytest.raises(SpecError) as err:
        load_spec(bad, registry=new_registry())
    (diag,) = err.value.diagnostics
    assert diag.code == "TC302"  # segment 32 (base.yaml) is not a multiple of chunk 5 (bad.yaml)
    assert diag.location.file.endswith("base.yaml") and diag.location.line == 9


def test_extends_list_merges_left_to_right(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    write(tmp_path, "deep.yaml", "memory:\n  depth: 3\n  heads: 4\n")
    write(tmp_path, "shallow.yaml", "memory:\n  depth: 1\n")
    child = write(tmp_path, "child.yaml", "extends: [base.yaml, deep.yaml, shallow.yaml]\n")
    memory = load_spec(child, registry=new_registry()).spec.memory
    assert (memory.depth, memory.heads) == (1, 4)


def test_extends_cycle_and_missing_target(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(SpecError) as err:
        load_document(tmp_path / "a.yaml")
    assert codes(err.value) == ["TC104"]
    assert "a.yaml" in err.value.diagnostics[0].message and "b.yaml" in err.value.diagnostics[0].message
    write(tmp_path, "c.yaml", "model: {vocab_size: 2, dim: 2}\nextends: nowhere.yaml\n")
    with pytest.raises(SpecError) as err:
        load_document(tmp_path / "c.yaml")
    assert codes(err.value) == ["TC105"] and err.value.diagnostics[0].location.line == 2


def test_overrides_set_nested_values_list_items_and_report_their_origin(tmp_path):
    path = write(tmp_path, "s.yaml", BASE)
    loaded = load_spec(
        path, ["memory.depth=3", "blocks.0.kind=mag", "update.loss={name: huber, delta: 2}"], registry=new_registry()
    )
    block = loaded.spec.blocks[0]
    assert block.kind == "mag" and block.memory.depth == 3 and block.update.loss.delta == 2.0
    with pytest.raises(SpecError) as err:
        load_spec(path, ["memory.depth=0"], registry=new_registry())
    (diag,) = err.value.diagnostics
    assert diag.code == "TC204" and diag.location.file == "--set memory.depth=0"


@pytest.mark.parametrize(
    "arg", ["memory.depth", "=3", "a..b=1", "blocks.7.kind=mac", "model.dim.x=1", "extends=other.yaml"]
)
def test_bad_overrides(tmp_path, arg):
    path = write(tmp_path, "s.yaml", BASE)
    with pytest.raises(SpecError) as err:
        load_document(path, [arg])
    assert codes(err.value) == ["TC106"]


def test_parse_override_reads_yaml_values():
    assert parse_override("a.0.b=[1, 2]") == (("a", 0, "b"), [1, 2])
    assert parse_override("x=off") == (("x",), False)
    assert parse_override("x=") == (("x",), None)


def test_block_overrides_merge_over_model_wide_sections(tmp_path):
    path = write(tmp_path, "s.yaml", BASE + "  - kind: lmm\n    memory: {depth: 1}\n")
    spec = load_spec(path, registry=new_registry()).spec
    mac, lmm = spec.blocks
    assert (mac.memory.depth, mac.memory.heads) == (2, 2)
    assert (lmm.memory.depth, lmm.memory.heads, lmm.memory.chunk_size) == (1, 2, 8)
    assert not hasattr(lmm, "attention")  # an lmm block takes no attention section


def test_a_model_wide_error_is_reported_once_not_per_block(tmp_path):
    path = write(tmp_path, "s.yaml", BASE.replace("heads: 2", "heads: 0") + "  - kind: mag\n  - kind: lmm\n")
    with pytest.raises(SpecError) as err:
        load_spec(path, registry=new_registry())
    assert [(d.code, d.path, d.location.line) for d in err.value.diagnostics] == [("TC204", "memory.heads", 5)]


def test_anchors_and_merge_keys_work(tmp_path):
    path = write(tmp_path, "s.yaml", BASE.replace("memory:\n", "memory: &mem\n") + "  - kind: lmm\n    memory: *mem\n")
    assert load_spec(path, registry=new_registry()).spec.blocks[1].memory.heads == 2
    doc = parse_yaml("base: &b {x: 1, y: 2}\nderived:\n  <<: *b\n  y: 3\n", "m.yaml")
    assert doc.data["derived"] == {"x": 1, "y": 3}


@pytest.mark.parametrize(
    "text,code",
    [
        ("a: &a [*a]\n", "TC108"),  # recursive alias
        ("a: !!python/object/apply:os.getcwd []\n", "TC108"),
        ("? [1, 2]\n: x\n", "TC108"),  # complex key
        ("a: 1\na: 2\n", "TC107"),
        ("a: 1\n---\nb: 2\n", "TC102"),
        ("a: [1, 2\n", "TC102"),
        ("a: " + "[" * 80 + "]" * 80 + "\n", "TC108"),  # nested deeper than any spec
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "TC108"),  # deeper than PyYAML's own recursion
        ("".join("  " * i + "k:\n" for i in range(1500)), "TC108"),
    ],
    ids=["alias", "tag", "complex_key", "duplicate", "two_documents", "unclosed", "deep", "deeper", "deep_mapping"],
)
def test_unsafe_or_broken_yaml(text, code):
    with pytest.raises(SpecError) as err:
        parse_yaml(text, "x.yaml")
    assert code in codes(err.value)


def test_alias_bomb_is_refused_quickly():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    with pytest.raises(SpecError) as err:
        parse_yaml("\n".join(lines) + "\n", "bomb.yaml")
    assert codes(err.value) == ["TC108"]


def test_file_problems(tmp_path):
    for path, code in [
        (tmp_path / "missing.yaml", "TC101"),
        (tmp_path, "TC101"),
        (write(tmp_path, "empty.yaml", ""), "TC103"),
        (write(tmp_path, "list.yaml", "- 1\n- 2\n"), "TC103"),
    ]:
        with pytest.raises(SpecError) as err:
            load_document(path)
        assert codes(err.value) == [code], path
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(SpecError) as err:
        load_document(binary)
    assert codes(err.value) == ["TC101"] and "UTF-8" in err.value.diagnostics[0].message


def test_subtree_rebases_locations():
    doc = parse_yaml("a:\n  b:\n    c: 1\n", "f.yaml")
    sub = doc.subtree(("a", "b"))
    assert isinstance(sub, SourceDoc) and sub.data == {"c": 1}
    assert sub.locs[("c",)].line == 3 and sub.keylocs[("c",)].col == 5


def test_cross_field_rules_use_defaults_of_unwritten_sections_when_other_errors_exist(tmp_path):
    """A typo elsewhere does not hide a cross-field problem that involves a section left at its defaults."""
    path = write(
        tmp_path,
        "s.yaml",
        """\
        model: {vocab_size: 256, dim: 128}
        memory: {chunk_size: 48}
        blocks:
          - kind: mac
            foo: 1
          - kind: lmm
        """,
    )
    with pytest.raises(SpecError) as err:
        load_spec(path, registry=new_registry())
    assert sorted((d.code, d.path) for d in err.value.diagnostics) == [
        ("TC201", "blocks.0.foo"),
        ("TC302", "blocks.0.mac.segment"),  # the default segment 128 against chunk 48; the lmm block has no segment
    ]


@pytest.mark.parametrize(
    "override",
    [
        "update.lr.max_lr=.inf",
        "update.forget.half_life=.nan",
        "model.init_std=-.inf",
        "update.loss={name: huber, delta: .inf}",
    ],
)
def test_non_finite_numbers_are_refused(tmp_path, override):
    path = write(tmp_path, "s.yaml", BASE)
    with pytest.raises(SpecError) as err:
        load_spec(path, [override], registry=new_registry())
    assert codes(err.value) == ["TC204"]
