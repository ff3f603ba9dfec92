"""A table of broken specs: each must fail with a stable error code at the line (and column) the user wrote.

Every case runs twice: through the CLI in-process (``titans-compose validate``, exit status 1, no traceback, a
rendered ``file:line:col: path: message [CODE]`` diagnostic at the expected place) and through the Python API
(``load_spec`` + ``compile_graph`` raise a ``SpecError`` holding a diagnostic with that code and line).

In the YAML of a case, the line a diagnostic must point at carries the comment ``# <-``; a meta-test checks that
the expected line numbers in the table agree with these markers, so the numbers are easy to check by eye.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from titans_compose.cli.main import cli
from titans_compose.errors import CODES, SpecError
from titans_compose.graph import compile_graph
from titans_compose.registry import default_registry
from titans_compose.spec import load_spec

MARK = "# <-"
MAIN = "spec.yaml"

# file:line:col: path: message [CODE] (pass: name)   -- path and pass are optional
LOCATED = re.compile(
    r"^(?P<where>.+?):(?P<line>\d+):(?P<col>\d+): (?P<body>.*) \[(?P<code>TC[0-9A-Z]{3})\](?: \(pass: \w+\))?$"
)
# file: message [CODE]   -- file-level problems (missing file) and --set overrides have no line
UNLOCATED = re.compile(r"^(?P<where>.+?): (?P<body>.*) \[(?P<code>TC[0-9A-Z]{3})\](?: \(pass: \w+\))?$")


def y(text: str) -> str:
    """Dedent a YAML snippet and drop the first newline, so line 1 is the first line written."""
    return textwrap.dedent(text).lstrip("\n")


@dataclass(frozen=True)
class Case:
    """One broken spec and the diagnostic it must produce.

    ``line``/``col`` of None: the diagnostic has no line (or the column is not checked). ``where`` is the location
    prefix of the diagnostic, ``{dir}`` standing for the test's folder; by default the main spec file.
    """

    id: str
    text: str | bytes | None  # the main spec (None: do not write it)
    code: str
    line: int | None
    col: int | None = None
    files: dict[str, str] = field(default_factory=dict)
    sets: tuple[str, ...] = ()
    hint: str | None = None
    where: str = "{dir}/" + MAIN
    plugin: str | None = None


BASE = y(
    """
    model:
      vocab_size: 256
      dim: 128
    """
)

# A plug-in block kind that lowers like MAC except that the memory is written from the (normalised) block input
# instead of the attention output, while declaring MAC's wiring rules: the wiring pass must catch it.
MISWIRED_PLUGIN = y(
    '''
    """Test plug-in: a MAC variant whose memory write reads the block input (wrong for MAC)."""
    from titans_compose.graph import blocks as B


    def lower_miswired(ctx, x):
        h = B._norm(ctx, "norm_mix", x)
        mem_tokens = B._memory_context_read(ctx, h)
        y = B._attention(ctx, "attention", h, "mac", persistent=B._persistent(ctx), memory=mem_tokens)
        m = B._memory(ctx, h, context_read=mem_tokens)  # MAC writes y, the attention output
        o = ctx.add("mac_gate", "gate", "mac", {"value": y, "gate": m}, form="identity")
        out = ctx.add("add_mix", "add", "mac", {"a": x, "b": o})
        return B._mlp_sublayer(ctx, out)


    def register(registry):
        sections = B.BLOCK_KINDS["mac"][0].sections
        registry.register(
            "block", "mac_miswired", B.BlockKind(sections, lower_miswired, B.wiring_mac), description="miswired MAC"
        )
    '''
)

CASES: list[Case] = [
    # ---------------------------------------------------------------------------------------- unknown keys
    Case(
        "typo_top_level_key",
        BASE + "memroy:  # <-\n  depth: 2\nblocks:\n  - kind: lmm\n",
        "TC201",
        4,
        1,
        hint="did you mean 'memory'?",
    ),
    Case(
        "typo_nested_key",
        BASE + "memory:\n  hedas: 2  # <-\nblocks:\n  - kind: lmm\n",
        "TC201",
        5,
        3,
        hint="did you mean 'heads'?",
    ),
    Case(
        "typo_in_model_section",
        y(
            """
            model:
              vocab_size: 256
              dimm: 128  # <-
            blocks:
              - kind: lmm
            """
        ),
        "TC201",
        3,
        3,
        hint="did you mean 'dim'?",
    ),
    Case(
        "typo_in_flow_mapping_two_levels_deep",
        BASE + "update:\n  lr: {max_rl: 0.4}  # <-\nblocks:\n  - kind: lmm\n",
        "TC201",
        5,
        8,
        hint="did you mean 'max_lr'?",
    ),
    Case(
        "typo_in_block",
        BASE + "blocks:\n  - kind: lmm\n    repaet: 2  # <-\n",
        "TC201",
        6,
        5,
        hint="did you mean 'repeat'?",
    ),
    Case(
        "section_the_block_kind_does_not_take",
        BASE + "blocks:\n  - kind: attention\n    memory: {depth: 2}  # <-\n",
        "TC201",
        6,
        5,
        hint="valid:",
    ),
    # ------------------------------------------------------------------------------------------ wrong type
    Case(
        "string_for_int",
        BASE + 'memory:\n  chunk_size: "16"  # <-\nblocks:\n  - kind: lmm\n',
        "TC203",
        5,
        15,
    ),
    Case(
        "list_for_bool",
        BASE + "memory:\n  residual: [true]  # <-\nblocks:\n  - kind: lmm\n",
        "TC203",
        5,
        13,
    ),
    Case("blocks_is_a_mapping", BASE + "blocks:\n  kind: lmm  # <-\n", "TC203", 5, 3),
    Case("model_is_a_scalar", "model: 256  # <-\nblocks:\n  - kind: lmm\n", "TC203", 1, 8),
    # ---------------------------------------------------------------------------------------- out of range
    Case("memory_depth_0", BASE + "memory:\n  depth: 0  # <-\nblocks:\n  - kind: lmm\n", "TC204", 5, 10),
    Case("memory_depth_9", BASE + "memory:\n  depth: 9  # <-\nblocks:\n  - kind: lmm\n", "TC204", 5, 10),
    Case(
        "negative_window",
        BASE + "attention:\n  window: -1  # <-\nblocks:\n  - kind: attention\n",
        "TC204",
        5,
        11,
    ),
    Case(
        "momentum_init_1_5",
        BASE + "update:\n  momentum:\n    init: 1.5  # <-\nblocks:\n  - kind: lmm\n",
        "TC204",
        6,
        11,
    ),
    Case("chunk_size_0", BASE + "memory:\n  chunk_size: 0  # <-\nblocks:\n  - kind: lmm\n", "TC204", 5, 15),
    Case("repeat_0", BASE + "blocks:\n  - kind: lmm\n    repeat: 0  # <-\n", "TC204", 6, 13),
    Case("empty_blocks_list", BASE + "blocks: []  # <-\n", "TC204", 4, 9),
    # ------------------------------------------------------------------------------ unknown registered names
    Case(
        "unknown_activation",
        BASE + "memory:\n  activation: sulu  # <-\nblocks:\n  - kind: lmm\n",
        "TC205",
        5,
        15,
        hint="did you mean 'silu'?",
    ),
    Case(
        "unknown_loss",
        BASE + "update:\n  loss: l3  # <-\nblocks:\n  - kind: lmm\n",
        "TC205",
        5,
        9,
        hint="valid: huber, l1, l2, lp",
    ),
    Case(
        "unknown_retention_rule",
        BASE + "update:\n  forget:\n    rule: {name: decoy}  # <-\nblocks:\n  - kind: lmm\n",
        "TC205",
        6,
        18,
        hint="did you mean 'decay'?",
    ),
    Case(
        "unknown_block_kind",
        BASE + "blocks:\n  - kind: macc  # <-\n",
        "TC205",
        5,
        11,
        hint="did you mean 'mac'?",
    ),
    Case(
        "unknown_attention_kind",
        BASE + "attention:\n  kind: slidingwindow  # <-\nblocks:\n  - kind: attention\n",
        "TC205",
        5,
        9,
        hint="did you mean 'sliding_window'?",
    ),
    # -------------------------------------------------------------------------------------- invalid choice
    Case(
        "invalid_retrieval",
        BASE + "memory:\n  retrieval: sometimes  # <-\nblocks:\n  - kind: lmm\n",
        "TC206",
        5,
        14,
        hint="after, before, per_chunk",
    ),
    Case(
        "invalid_norm_kind",
        BASE + "norm: {kind: batchnorm}  # <-\nblocks:\n  - kind: lmm\n",
        "TC206",
        4,
        14,
    ),
    # ---------------------------------------------------------------------------------- missing required
    Case(
        "missing_vocab_size",
        "name: no-vocab\nmodel:  # <-\n  dim: 128\nblocks:\n  - kind: lmm\n",
        "TC202",
        2,
        1,
    ),
    Case("missing_model", "blocks:  # <-\n  - kind: lmm\n", "TC202", 1, 1),
    Case("missing_blocks", BASE.replace("model:", "model:  # <-"), "TC202", 1, 1),
    Case(
        "block_without_kind",
        BASE + "blocks:\n  - kind: lmm\n  - repeat: 2  # <-\n",
        "TC202",
        6,
        5,
        hint="mac, mag, mal, lmm, attention",
    ),
    # ------------------------------------------------------------------------------------------- extends
    Case(
        "extends_target_missing",
        "extends: nowhere.yaml  # <-\n" + BASE + "blocks:\n  - kind: lmm\n",
        "TC105",
        1,
        10,
    ),
    Case("extends_not_a_path", "extends: 3  # <-\n" + BASE, "TC105", 1, 10),
    Case("extends_empty_list", "name: x\nextends: []  # <-\n", "TC105", 2, 10),
    Case("extends_nul_byte", 'name: x\nextends: "a\\0b"  # <-\n', "TC105", 2, 10),  # no file has that name
    Case(
        "extends_cycle_of_two_files",
        "name: a\nextends: b.yaml\n",
        "TC104",
        2,
        10,
        files={"b.yaml": "name: b\nextends: spec.yaml  # <-\n"},
        where="{dir}/b.yaml",
    ),
    Case("extends_itself", "# inherits from itself\nextends: spec.yaml  # <-\n", "TC104", 2, 10),
    Case(
        "error_in_parent_is_reported_in_parent",
        "extends: parent/base.yaml\nname: child\n",
        "TC204",
        5,
        10,
        files={"parent/base.yaml": BASE + "memory:\n  depth: 0  # <-\nblocks:\n  - kind: lmm\n"},
        where="{dir}/parent/base.yaml",
    ),
    # ---------------------------------------------------------------------------------------- YAML syntax
    Case(
        # the parser notices the missing `}` at the next key, so that is the line reported
        "unclosed_flow_mapping",
        "model: {vocab_size: 256, dim: 128\nblocks:  # <-\n  - kind: lmm\n",
        "TC102",
        2,
    ),
    Case(
        "mismatched_bracket",
        "model: {vocab_size: 256, dim: 128]  # <-\nblocks:\n  - kind: lmm\n",
        "TC102",
        1,
        34,
    ),
    Case(
        "over_indented_key",
        "model:\n  vocab_size: 256\n   dim: 128  # <-\nblocks:\n  - kind: lmm\n",
        "TC102",
        3,
    ),
    Case(
        "under_indented_key",
        "model:\n  vocab_size: 256\n dim: 128  # <-\nblocks:\n  - kind: lmm\n",
        "TC102",
        3,
    ),
    Case("tab_indentation", "model:\n  vocab_size: 256\n\tdim: 128  # <-\n", "TC102", 3, 1),
    Case("two_documents", BASE + "--- # <-\nblocks:\n  - kind: lmm\n", "TC102", 4, 1),
    Case(
        "duplicate_key",
        "model:\n  vocab_size: 256\n  dim: 128\n  vocab_size: 512  # <-\nblocks:\n  - kind: lmm\n",
        "TC107",
        4,
        3,
        hint="already set at line 2",
    ),
    Case(
        "duplicate_key_in_flow_mapping",
        "model: {vocab_size: 256, dim: 128, dim: 64}  # <-\nblocks:\n  - kind: lmm\n",
        "TC107",
        1,
        36,
    ),
    Case(
        "custom_tag",
        BASE + "name: !shiny model  # <-\nblocks:\n  - kind: lmm\n",
        "TC108",
        4,
        7,
    ),
    Case(
        "python_name_tag",
        BASE + "name: !!python/name:os.system ''  # <-\nblocks:\n  - kind: lmm\n",
        "TC108",
        4,
        7,
    ),
    # ------------------------------------------------------------------------------------------ top level
    Case("top_level_list", "- model  # <-\n- blocks\n", "TC103", 1, 1),
    Case("top_level_string", "just a sentence  # <-\n", "TC103", 1, 1),
    Case("empty_file", "", "TC103", 1, 1),
    Case("comment_only_file", "# nothing but a comment  # <-\n", "TC103", 1, 1),
    # ------------------------------------------------------------------------------------- unreadable file
    Case("missing_file", None, "TC101", None),
    Case("not_utf8", b"model:\n  vocab_size: 256\nname: caf\xe9\n", "TC101", None),
    Case("spec_is_a_directory", None, "TC101", None, files={"spec.yaml/keep.txt": "x"}),
    # ----------------------------------------------------------------------------------------- --set
    Case(
        "set_without_equals",
        BASE + "blocks:\n  - kind: lmm\n",
        "TC106",
        None,
        sets=("memory.depth",),
        where="--set memory.depth",
        hint="e.g. --set memory.depth=3",
    ),
    Case(
        "set_empty_path",
        BASE + "blocks:\n  - kind: lmm\n",
        "TC106",
        None,
        sets=("=3",),
        where="--set =3",
    ),
    Case(
        "set_bad_yaml_value",
        BASE + "blocks:\n  - kind: lmm\n",
        "TC106",
        None,
        sets=("memory.depth=[1",),
        where="--set memory.depth=[1",
    ),
    Case(
        "set_list_index_out_of_range",
        BASE + "blocks:\n  - kind: lmm\n",
        "TC106",
        None,
        sets=("blocks.3.kind=mag",),
        where="--set blocks.3.kind=mag",
    ),
    Case(
        "set_value_out_of_range",
        BASE + "blocks:\n  - kind: lmm\n",
        "TC204",
        None,
        sets=("memory.depth=12",),
        where="--set memory.depth=12",
    ),
    # ------------------------------------------------------------------------------------- cross-field
    Case(
        "attention_heads_do_not_divide_dim",
        BASE + "attention:\n  heads: 3  # <-\nblocks:\n  - kind: attention\n",
        "TC301",
        5,
        10,
        hint="set attention.head_dim",
    ),
    Case(
        "attention_heads_in_block_override",
        BASE + "blocks:\n  - kind: attention\n  - kind: attention\n    attention:\n      heads: 5  # <-\n",
        "TC301",
        8,
        14,
    ),
    Case(
        "mac_segment_not_multiple_of_chunk",
        BASE + "memory:\n  chunk_size: 16\nmac:\n  segment: 40  # <-\nblocks:\n  - kind: mac\n",
        "TC302",
        7,
        12,
    ),
    Case(
        "lr_init_not_below_max_lr",
        BASE + "update:\n  lr:\n    max_lr: 0.5\n    init: 0.5  # <-\nblocks:\n  - kind: lmm\n",
        "TC303",
        7,
        11,
    ),
    Case(
        "mac_order_not_a_permutation",
        BASE + "mac:\n  order: [persistent, memory, memory]  # <-\nblocks:\n  - kind: mac\n",
        "TC304",
        5,
        10,
    ),
    # ------------------------------------------------------------------------------------------- graph
    Case(
        "memory_width_without_out_proj_top_level",
        BASE + "memory:  # <-\n  heads: 2\n  head_dim: 32\n  out_proj: false\nblocks:\n  - kind: lmm\n",
        "TC403",
        4,
        1,
        hint="memory.out_proj: true",
    ),
    Case(
        "memory_width_without_out_proj_in_block",
        BASE + "blocks:\n  - kind: lmm\n  - kind: lmm\n    memory:  # <-\n      out_proj: false\n      head_dim: 16\n",
        "TC403",
        7,
        5,
    ),
    Case(
        "mac_memory_tokens_too_narrow",
        BASE + "mac:  # <-\n  segment: 64\nmemory: {heads: 2, head_dim: 32, out_proj: false}\nblocks:\n  - kind: mac\n",
        "TC403",
        4,
        1,
    ),
    Case(
        "wiring_memory_written_from_block_input",
        BASE + "memory:  # <-\n  heads: 2\n  head_dim: 64\nblocks:\n  - kind: mac_miswired\n",
        "TC404",
        4,
        1,
        plugin=MISWIRED_PLUGIN,
        hint="docs/memory-math.md section 5",
    ),
]

# Cases that once crashed the loader or were reported at the wrong place (regressions).
CASES += [
    Case(
        "error_in_mac_section_of_mac_block",
        BASE + "blocks:\n  - kind: mac\n    mac:\n      segment: 0  # <-\n",
        "TC204",
        7,
        16,
    ),
    Case(
        "typo_in_mag_section_of_mag_block",
        BASE + "blocks:\n  - kind: mag\n    mag:\n      gatte: silu  # <-\n",
        "TC201",
        7,
        7,
        hint="did you mean 'gate'?",
    ),
    Case("block_kind_is_a_list", BASE + "blocks:\n  - kind: [mac]  # <-\n", "TC205", 5, 11),
    Case("blocks_is_an_integer", BASE + "blocks: 3  # <-\n", "TC203", 4, 9),
    Case("control_character", BASE + "name: a\x01b  # <-\nblocks:\n  - kind: lmm\n", "TC102", 4),
]

# Issue 15: input that escaped its folder, exploded the loader, reached the allocator or crashed with exit 3.
CASES += [
    Case("name_is_a_relative_path", BASE + "name: ../../../x  # <-\nblocks:\n  - kind: lmm\n", "TC208", 4, 7),
    Case("name_is_absolute", BASE + "name: /tmp/x  # <-\nblocks:\n  - kind: lmm\n", "TC208", 4, 7),
    Case("name_starts_with_a_dot", BASE + "name: .hidden  # <-\nblocks:\n  - kind: lmm\n", "TC208", 4, 7),
    Case("name_too_long", BASE + f"name: {'n' * 129}  # <-\nblocks:\n  - kind: lmm\n", "TC208", 4, 7),
    Case(
        "name_set_to_a_path",
        BASE + "blocks:\n  - kind: lmm\n",
        "TC208",
        None,
        sets=("name=a/../../b",),
        where="--set name=a/../../b",
    ),
    Case(
        "model_dim_a_billion",
        "model:\n  vocab_size: 256\n  dim: 1000000000\nblocks:\n  - kind: lmm  # <-\n",
        "TC306",
        5,
        5,
        hint="TITANS_COMPOSE_MAX_PARAMS",
    ),
    Case(
        "vocab_a_billion",
        "model:  # <-\n  vocab_size: 1000000000\n  dim: 128\nblocks:\n  - kind: lmm\n",
        "TC306",
        1,
        1,
    ),
    Case(
        "memory_heads_a_million",
        BASE + "memory: {heads: 1000000}\nblocks:\n  - kind: lmm  # <-\n",
        "TC306",
        6,
        5,
    ),
    Case(
        "attention_heads_a_million",
        BASE + "attention: {heads: 1000000, head_dim: 64}\nblocks:\n  - kind: attention  # <-\n",
        "TC306",
        6,
        5,
    ),
    Case(
        "memory_expansion_a_million",
        BASE + "memory: {expansion: 1000000.0}\nblocks:\n  - kind: lmm  # <-\n",
        "TC306",
        6,
        5,
    ),
    Case(
        "persistent_tokens_a_billion",
        BASE + "persistent: {tokens: 1000000000}\nblocks:\n  - kind: mag  # <-\n",
        "TC306",
        6,
        5,
    ),
    Case(
        "more_than_1024_layers",  # a billion is in test_limits.py (in a subprocess: it hung the old code)
        BASE + "blocks:\n  - kind: lmm\n  - kind: mag\n    repeat: 1024  # <-\n",
        "TC307",
        7,
        13,
        hint="repeat counts",
    ),
    Case(
        "integer_of_5000_digits",
        f"model:\n  vocab_size: {'9' * 5000}  # <-\n  dim: 128\nblocks:\n  - kind: lmm\n",
        "TC108",
        2,
        15,
    ),
    Case(
        "integer_of_5000_digits_in_set",
        BASE + "blocks:\n  - kind: lmm\n",
        "TC106",
        None,
        sets=(f"model.dim={'9' * 5000}",),
        where=f"--set model.dim={'9' * 5000}",
    ),
    Case(
        "base_60_integer_of_20000_fields",
        f"model: {{vocab_size: 1{':1' * 20_000}, dim: 128}}  # <-\nblocks: [{{kind: lmm}}]\n",
        "TC108",
        1,
        21,
    ),
    Case("timestamp_out_of_range", BASE + "description: 2001-13-45  # <-\nblocks:\n  - kind: lmm\n", "TC108", 4, 14),
    Case("recursive_merge_key", BASE + "memory: &m {depth: 1, <<: *m}  # <-\nblocks:\n  - kind: lmm\n", "TC108", 4, 9),
    Case(
        "merge_key_bomb",
        BASE
        + "x0: &x0 {}  # <-\n"  # merges add no value, so only counting the merges themselves stops this
        + "".join(f"x{i}: &x{i} {{<<: [{', '.join([f'*x{i - 1}'] * 10)}]}}\n" for i in range(1, 7))
        + "blocks:\n  - kind: lmm\n",
        "TC108",
        4,
        5,
    ),
    Case(
        "merge_chain_deeper_than_any_spec",
        BASE
        + "x0: &x0 {a: 1}  # <-\n"
        + "".join(f"x{i}: &x{i} {{<<: *x{i - 1}}}\n" for i in range(1, 100))
        + "blocks:\n  - kind: lmm\n",
        "TC108",
        4,
        13,
    ),
    Case(
        "sweep_file_given_to_validate",
        "base: titans_lmm_small.yaml  # <-\ngrid: {memory.depth: [1, 2]}\n",
        "TC109",
        1,
        1,
        hint="titans-compose sweep",
    ),
]


# ------------------------------------------------------------------------------------------------ helpers


def parse_stderr(text: str) -> list[dict]:
    """Rendered diagnostics as dicts (where, line, col, body, code, hint); hint lines attach to the one before."""
    diags: list[dict] = []
    for raw in text.split("\n"):
        if not raw:
            continue
        if raw.startswith("    hint: "):
            assert diags, f"hint line with no diagnostic before it: {raw!r}"
            diags[-1]["hint"] = raw[len("    hint: ") :]
            continue
        m = LOCATED.match(raw)
        if m:
            diags.append({**m.groupdict(), "line": int(m["line"]), "col": int(m["col"]), "hint": ""})
            continue
        m = UNLOCATED.match(raw)
        assert m, f"stderr line is not a diagnostic: {raw!r}"
        diags.append({**m.groupdict(), "line": None, "col": None, "hint": ""})
    return diags


def write_case(case: Case, tmp_path: Path) -> tuple[str, list[str]]:
    """Write the case's files; return the spec path and the CLI's global options (the plug-in)."""
    for name, text in case.files.items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    spec = tmp_path / MAIN
    if isinstance(case.text, bytes):
        spec.write_bytes(case.text)
    elif case.text is not None:
        spec.write_text(case.text, encoding="utf-8")
    options = []
    if case.plugin is not None:
        plugin = tmp_path / "miswired_plugin.py"
        plugin.write_text(case.plugin, encoding="utf-8")
        options = ["--plugin", str(plugin)]
    return str(spec), options


def check_cli(case: Case, tmp_path: Path, runner) -> None:
    spec, options = write_case(case, tmp_path)
    args = [*options, "validate", spec]
    for s in case.sets:
        args += ["--set", s]
    result = runner.invoke(cli, args)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    assert not result.stdout, "a failing spec prints nothing on stdout"
    where = case.where.format(dir=tmp_path)
    diags = parse_stderr(result.stderr)
    assert all(d["code"] in CODES for d in diags)
    found = [
        d
        for d in diags
        if d["code"] == case.code
        and d["where"] == where
        and d["line"] == case.line
        and (case.col is None or d["col"] == case.col)
    ]
    at = f"{where}:{case.line}:{case.col}" if case.line is not None else where
    assert found, f"no {case.code} diagnostic at {at}; got:\n{result.stderr}"
    if case.hint is not None:
        assert any(case.hint in d["hint"] for d in found), f"hint {case.hint!r} missing:\n{result.stderr}"


def check_api(case: Case, tmp_path: Path) -> None:
    spec, options = write_case(case, tmp_path)
    registry, problems = default_registry(options[1:])
    assert not problems, problems
    with pytest.raises(SpecError) as info:
        compile_graph(load_spec(spec, case.sets, registry=registry))
    matching = [d for d in info.value.diagnostics if d.code == case.code]
    assert matching, f"{case.code} not in {info.value.codes}"
    where = case.where.format(dir=tmp_path)
    assert any(
        d.location is not None
        and d.location.file == where
        and d.location.line == (case.line or 0)
        and (case.col is None or d.location.col == case.col)
        for d in matching
    ), [str(d.location) for d in matching]


# -------------------------------------------------------------------------------------------------- tests


def _params(cases: list[Case]) -> list:
    return [pytest.param(c, id=c.id) for c in cases]


def test_table_is_big_and_ids_are_unique():
    """At least 30 broken specs, each with a unique id and a documented code."""
    ids = [c.id for c in CASES]
    assert len(CASES) >= 30
    assert len(set(ids)) == len(ids)
    assert all(c.code in CODES for c in CASES)


@pytest.mark.parametrize("case", _params(CASES))
def test_expected_line_is_marked(case: Case):
    """The expected line carries the `# <-` marker in the file the diagnostic points at (when it has a line)."""
    if case.line is None:
        return
    name = case.where.removeprefix("{dir}/")
    text = case.text if name == MAIN else case.files[name]
    if not text:
        assert case.line == 1  # an empty file is reported at its start
        return
    marked = [n for n, line in enumerate(text.split("\n"), start=1) if MARK in line]
    assert marked == [case.line]


@pytest.mark.parametrize("case", _params(CASES))
def test_cli_reports_code_at_line(case: Case, tmp_path: Path, runner):
    """`titans-compose validate` exits 1 and renders the diagnostic at the expected file:line:col."""
    check_cli(case, tmp_path, runner)


@pytest.mark.parametrize("case", _params(CASES))
def test_api_reports_code_at_line(case: Case, tmp_path: Path):
    """load_spec + compile_graph raise a SpecError with the code at the expected location."""
    check_api(case, tmp_path)


def test_python_tag_is_never_executed(tmp_path: Path, runner):
    """A `!!python/object/apply` tag is reported (TC108) and the call it names never runs."""
    marker = tmp_path / "pwned"
    text = BASE + f'name: !!python/object/apply:os.system ["touch {marker}"]  # <-\nblocks:\n  - kind: lmm\n'
    case = Case("python_object_apply", text, "TC108", 4, 7)
    check_cli(case, tmp_path, runner)
    check_api(case, tmp_path)
    assert not marker.exists()
    result = runner.invoke(cli, ["validate", str(tmp_path / MAIN)])
    assert "tag:yaml.org,2002:python/object/apply:os.system" in result.stderr


def test_wiring_control_real_mac_block_is_valid(tmp_path: Path, runner):
    """Control for the TC404 case: the same spec with a real MAC block is valid, so TC404 comes from the wiring."""
    spec = tmp_path / MAIN
    spec.write_text(BASE + "memory:\n  heads: 2\n  head_dim: 64\nblocks:\n  - kind: mac\n", encoding="utf-8")
    result = runner.invoke(cli, ["validate", str(spec)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ok: {spec}")


MANY_ERRORS = y(
    """
    model:
      vocab_size: 256
      dim: 128
    memory:
      depth: 0                # TC204
      retrieval: sometimes    # TC206
      activation: sulu        # TC205
      chunk_size: "16"        # TC203
    update:
      lr: {max_rl: 0.3}       # TC201
    blocks:
      - kind: lmm
      - kind: attention
        attention:
          heads: 3            # TC301 (this block is valid on its own, so its cross-field rules run)
      - kind: mystery         # TC205
      - repeat: 2             # TC202
    """
)
MANY_EXPECTED = {
    ("TC204", 5, 10),
    ("TC206", 6, 14),
    ("TC205", 7, 15),
    ("TC203", 8, 15),
    ("TC201", 10, 8),
    ("TC301", 15, 14),
    ("TC205", 16, 11),
    ("TC202", 17, 5),
}


def test_all_independent_errors_reported_at_once(tmp_path: Path, runner):
    """Eight independent problems in one spec come back together, each once, in line order."""
    lines = MANY_ERRORS.split("\n")
    for code, line, _ in MANY_EXPECTED:  # the comment on each expected line names its code
        assert code in lines[line - 1]
    spec = tmp_path / MAIN
    spec.write_text(MANY_ERRORS, encoding="utf-8")
    result = runner.invoke(cli, ["validate", str(spec)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    diags = parse_stderr(result.stderr)
    got = [(d["code"], d["line"], d["col"]) for d in diags]
    assert set(got) == MANY_EXPECTED
    assert len(got) == len(MANY_EXPECTED), "each problem is reported once"
    assert [g[1] for g in got] == sorted(g[1] for g in got)
    assert len({code for code, _, _ in got}) >= 4

    with pytest.raises(SpecError) as info:
        compile_graph(load_spec(str(spec)))
    api = {(d.code, d.location.line, d.location.col) for d in info.value.diagnostics}
    assert api == MANY_EXPECTED


def test_several_spec_files_each_report_their_errors(tmp_path: Path, runner):
    """validate with two bad specs and a good one reports both bad ones and exits 1."""
    good = tmp_path / "good.yaml"
    good.write_text(BASE + "blocks:\n  - kind: lmm\n", encoding="utf-8")
    bad1 = tmp_path / "bad1.yaml"
    bad1.write_text(BASE + "blocks:\n  - kind: lmn\n", encoding="utf-8")
    bad2 = tmp_path / "bad2.yaml"
    bad2.write_text(BASE + "memory:\n  depth: 0\nblocks:\n  - kind: lmm\n", encoding="utf-8")
    result = runner.invoke(cli, ["validate", str(bad1), str(good), str(bad2)])
    assert result.exit_code == 1
    assert f"ok: {good}" in result.stdout
    got = {(d["where"], d["code"], d["line"]) for d in parse_stderr(result.stderr)}
    assert got == {(str(bad1), "TC205", 5), (str(bad2), "TC204", 5)}
