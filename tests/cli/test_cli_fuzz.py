"""Property tests of `titans-compose validate` on arbitrary and on mutated specs.

(a) Arbitrary YAML documents and random text never make the CLI crash (no traceback, exit status 0 or 1) and
never pass unless the document really is a spec. (b) One invalidating mutation of a shipped spec always gives
exit status 1 with well-formed ``file:line:col: path: message [CODE]`` diagnostics, including the mutation's code.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.helpers import SPECS, shipped_specs
from titans_compose.cli.main import cli
from titans_compose.errors import CODES, SpecError
from titans_compose.graph import compile_graph
from titans_compose.registry import KINDS, new_registry
from titans_compose.spec import load_spec
from titans_compose.spec.schema import json_schema

# TC_FUZZ_EXAMPLES=2000 for a longer run
EXAMPLES = int(os.environ.get("TC_FUZZ_EXAMPLES", "75"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LOCATED = re.compile(
    r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<path>[\w.]+): (?P<message>.+) "
    r"\[(?P<code>TC[0-9A-Z]{3})\](?: \(pass: \w+\))?$"
)
FILE_LEVEL = re.compile(r"^(?P<file>[^:]+): (?P<message>.+) \[(?P<code>TC[0-9A-Z]{3})\]$")


# ---------------------------------------------------------------------------------------- the vocabulary


def _property_names(node: Any) -> Iterator[str]:
    """Every key of every ``properties`` object in a JSON schema."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                yield from value
            yield from _property_names(value)
    elif isinstance(node, list):
        for item in node:
            yield from _property_names(item)


_REGISTRY = new_registry()
FIELD_NAMES = frozenset(_property_names(json_schema(_REGISTRY)))
REGISTERED = frozenset(name for kind in KINDS for name in _REGISTRY.names(kind))
# the Literal choices of the shipped specs' fields (retrieval, init, gates, norm and mlp kinds, MAC order parts)
CHOICES = frozenset(
    {"after", "before", "per_chunk", "learned", "zero", "sigmoid", "silu", "none", "linear", "per_token"}
    | {"constant", "rmsnorm", "layernorm", "swiglu", "gelu", "persistent", "memory", "segment"}
)
VALID_NAMES = REGISTERED | CHOICES
TOP_KEYS = ("model", "blocks", "memory", "update", "attention", "mac", "mag", "mlp", "norm", "persistent", "name")


def _shipped() -> dict[str, Any]:
    """The shipped specs that stand alone (no `extends`), as plain data."""
    out = {}
    for path in shipped_specs():
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if "extends" not in data:
            out[str(path.relative_to(SPECS))] = data
    return out


SHIPPED = _shipped()


# ---------------------------------------------------------------------------------------------- helpers


_WORKDIR = tempfile.TemporaryDirectory(prefix="tc-fuzz-")  # removed when the interpreter exits


def run_validate(text: str | bytes, *args: str) -> tuple[Any, str]:
    """Write ``text`` to the spec file (one per process) and run `validate` on it in-process; (result, path)."""
    path = os.path.join(_WORKDIR.name, "spec.yaml")
    with open(path, "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode("utf-8"))
    return CliRunner().invoke(cli, ["validate", path, *args]), path


def assert_no_crash(result: Any) -> None:
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 1), result.output


def is_valid_by_api(path: str) -> bool:
    try:
        compile_graph(load_spec(path))
    except SpecError:
        return False
    return True


def check_outcome(result: Any, path: str, data: Any, parsed: bool) -> None:
    """Exit 0 only for a document with `model` and `blocks` that the Python API accepts too."""
    assert_no_crash(result)
    event(f"exit {result.exit_code}: " + " ".join(sorted(set(re.findall(r"\[(TC\w+)\]", result.stderr)))))
    looks_like_spec = isinstance(data, dict) and "model" in data and "blocks" in data
    if parsed and not looks_like_spec:
        assert result.exit_code == 1, result.output
    if result.exit_code == 0:
        assert looks_like_spec
        assert is_valid_by_api(path)
    else:
        assert "[TC" in result.stderr, "a failure comes with at least one diagnostic"
        assert not is_valid_by_api(path)


# ---------------------------------------------------------------------------------- (a) arbitrary documents

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(sorted(VALID_NAMES)),
)
keys = st.one_of(st.sampled_from(sorted(FIELD_NAMES)), st.text(max_size=10))
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=30,
)
# documents shaped a little like specs, so the fuzzing gets past the top level
spec_like = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(
            documents,
            st.fixed_dictionaries(
                {}, optional={"vocab_size": st.one_of(st.integers(-3, 300), documents), "dim": documents}
            ),
        ),
        "blocks": st.one_of(
            documents,
            st.lists(
                st.one_of(
                    documents,
                    st.dictionaries(st.sampled_from(["kind", "repeat", "memory", "attention", "mac"]), documents),
                ),
                max_size=3,
            ),
        ),
        **{k: documents for k in TOP_KEYS[2:]},
    },
)


# shipped specs with a random name and description: valid, so the exit-0 branch is exercised too
valid_specs = st.builds(
    lambda base, name, text: {**base, "name": name, "description": text},
    st.sampled_from([SHIPPED[k] for k in sorted(SHIPPED)]),
    st.text(max_size=10),
    st.one_of(st.none(), st.text(max_size=30)),
)


@FUZZ
@given(st.one_of(documents, spec_like, st.dictionaries(st.sampled_from(TOP_KEYS), documents, max_size=6), valid_specs))
def test_arbitrary_yaml_documents_never_crash(data):
    """Any YAML data: exit 0 or 1, never a traceback, and 1 unless it is a spec with `model` and `blocks`."""
    result, path = run_validate(yaml.safe_dump(data))
    check_outcome(result, path, data, parsed=True)


yaml_alphabet = st.one_of(
    st.sampled_from(list(" \n\t-:,[]{}#&*!|>'\"%@`?~.0123456789abkmnoy_")),
    st.characters(codec="utf-8", exclude_categories=("Cs",)),  # control characters included: YAML rejects them
)
yaml_words = st.sampled_from(["model:", "blocks:", "- kind: mac", "  ", "\n", "!!python/name:os.system", "&a", "*a"])


@FUZZ
@given(
    st.one_of(
        st.text(yaml_alphabet, max_size=80),
        st.lists(st.one_of(yaml_words, st.text(yaml_alphabet, max_size=5))).map("".join),
    )
)
def test_random_text_never_crashes(text):
    """Any text as a spec file: a diagnostic (usually TC102/TC103) with exit 1, never a traceback."""
    try:
        data, parsed = yaml.safe_load(text), True
    except yaml.YAMLError:
        data, parsed = None, False
    result, path = run_validate(text)
    check_outcome(result, path, data, parsed)


@settings(max_examples=max(EXAMPLES // 2, 1), deadline=None)
@given(st.binary(max_size=60))
def test_random_bytes_never_crash(raw):
    """Arbitrary bytes (often not UTF-8: TC101) never crash the CLI."""
    result, _ = run_validate(raw)
    assert_no_crash(result)


# ------------------------------------------------------------------------------------ (b) mutated specs


def _walk(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, i))


def _set(data: Any, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        data = data[part]
    data[path[-1]] = value


NAME_KEYS = {"activation", "kind", "loss", "retrieval", "gate"}
unknown_keys = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True).filter(lambda k: k not in FIELD_NAMES)
# no line breaks: messages quote names unescaped (reported separately), which would split a diagnostic line
garbage_names = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=12
).filter(lambda s: s not in VALID_NAMES)


@st.composite
def mutated_specs(draw) -> tuple[str, str, Any, set[str]]:
    """(spec name, mutation, mutated data, codes of which one must be reported)."""
    name = draw(st.sampled_from(sorted(SHIPPED)))
    data = copy.deepcopy(SHIPPED[name])
    nodes = list(_walk(data))
    mutation = draw(
        st.sampled_from(["unknown_key", "int_to_string", "int_to_negative", "delete_model", "delete_vocab", "name"])
    )
    if mutation == "unknown_key":
        path = draw(st.sampled_from([p for p, v in nodes if isinstance(v, dict)]))
        target = data
        for part in path:
            target = target[part]
        target[draw(unknown_keys)] = draw(st.one_of(st.integers(), st.text(max_size=5), st.booleans()))
        return name, mutation, data, {"TC201"}
    if mutation in ("int_to_string", "int_to_negative"):
        ints = [p for p, v in nodes if isinstance(v, int) and not isinstance(v, bool)]
        path = draw(st.sampled_from(ints))
        if mutation == "int_to_string":
            _set(data, path, draw(st.text(max_size=8)))
            return name, mutation, data, {"TC203"}
        _set(data, path, -1000)
        return name, mutation, data, {"TC204"}
    if mutation == "delete_model":
        del data["model"]
        return name, mutation, data, {"TC202"}
    if mutation == "delete_vocab":
        del data["model"]["vocab_size"]
        return name, mutation, data, {"TC202"}
    named = [p for p, v in nodes if p and p[-1] in NAME_KEYS and isinstance(v, str)]
    _set(data, draw(st.sampled_from(named)), draw(garbage_names))
    return name, mutation, data, {"TC205", "TC206"}


def test_shipped_standalone_specs_are_valid():
    """The starting points of the mutations validate cleanly (so each mutation is what breaks them)."""
    assert len(SHIPPED) >= 5
    for name, data in SHIPPED.items():
        result, _ = run_validate(yaml.safe_dump(data, sort_keys=False))
        assert result.exit_code == 0, (name, result.output)


@FUZZ
@given(mutated_specs())
def test_mutated_specs_fail_with_well_formed_diagnostics(mutated):
    """One invalidating mutation: exit 1, no traceback, every diagnostic line well formed, the right code."""
    name, mutation, data, codes = mutated
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    result, path = run_validate(text)
    assert_no_crash(result)
    assert result.exit_code == 1, (name, mutation, result.output)
    n_lines = text.count("\n") + 1
    seen = set()
    for line in result.stderr.split("\n"):
        if not line or line.startswith("    hint: "):
            continue
        m = LOCATED.match(line) or FILE_LEVEL.match(line)
        assert m, f"malformed diagnostic line: {line!r}"
        assert m["file"] == path
        assert m["code"] in CODES
        if "line" in m.groupdict():
            assert 1 <= int(m["line"]) <= n_lines and int(m["col"]) >= 1
        seen.add(m["code"])
    assert seen & codes, (mutation, seen, result.stderr)


@pytest.mark.parametrize("blocks", ["3", "1.5", "true"])
def test_scalar_blocks_are_still_rejected_when_model_is_bad(blocks):
    """A scalar `blocks` is a wrong type whether or not the rest of the spec is valid."""
    result, _ = run_validate(f"model: {{vocab_size: 256}}\nblocks: {blocks}\n")
    assert_no_crash(result)
    assert result.exit_code == 1
    assert "blocks: Input should be a valid list" in result.stderr
