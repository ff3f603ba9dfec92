"""benchmarks/record.py: the recorded command reruns as it was typed."""

from __future__ import annotations

import shlex

from tests.helpers import load_benchmark

record = load_benchmark("record.py", "record_under_test")


def test_the_recorded_command_quotes_arguments_with_spaces(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(record, "RESULTS", tmp_path / "RESULTS.md")
    argv = ["--settings", "as shipped", "--threads", "1"]
    record.append_section("Title", "benchmarks/outer_gradients.py", "| a |", argv)
    line = next(x for x in (tmp_path / "RESULTS.md").read_text().splitlines() if x.startswith("Command: "))
    command = line.removeprefix("Command: `").removesuffix("`  ")
    assert command == "python benchmarks/outer_gradients.py --settings 'as shipped' --threads 1"
    assert shlex.split(command)[2:] == argv
