"""benchmarks/long_context.py: a variant trained in another interpreter (the titans-pytorch side by side) gives the
result training it here gives, and titans-pytorch's model runs behind the loop's interface where it is installed."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

from tests.helpers import load_benchmark
from titans_compose.train.data import load_corpus
from titans_compose.train.tasks import passkey_batch

long_context = load_benchmark("long_context.py", "long_context_under_test")


def tiny_args(**changes: object) -> argparse.Namespace:
    args = dict(
        steps=2, lm_steps=1, batch=2, train_len=64, lengths=[64], digits=2, samples=32, lr=3e-3, seed=0, threads=1,
        jobs=1, set=[], no_record=True, titans_python=sys.executable, worker=None, worker_args=None, filler="repeat",
        warmup=None,
    )  # fmt: skip
    return argparse.Namespace(**{**args, **changes})


@pytest.mark.slow
def test_a_variant_run_in_another_interpreter_equals_the_run_here() -> None:
    args = tiny_args()
    remote = long_context.run_in_titans_python("SWA", args)
    here = long_context.run_variant("SWA", tiny_args(worker="SWA"))
    assert remote["params"] == here["params"]
    assert remote["accuracy"] == here["accuracy"]  # int keys again after JSON
    assert [tuple(point) for point in remote["curve"]] == here["curve"]
    assert remote["bpb"] == pytest.approx(here["bpb"], rel=1e-12)


def test_a_failing_worker_names_the_variant_and_its_error() -> None:
    with pytest.raises(RuntimeError, match=r"NOPE in .* failed \(exit [12]\)"):
        long_context.run_in_titans_python("NOPE", tiny_args())


def test_titans_pytorch_mac_trains_behind_the_logits_interface() -> None:
    pytest.importorskip("titans_pytorch")
    model = long_context.titans_pytorch_mac()
    assert all(0 not in p.stride() for p in model.parameters())  # every parameter can be updated in place
    tokens = torch.randint(0, 256, (2, 64))
    logits = model(tokens).logits
    assert logits.shape == (2, 64, 256)
    logits.sum().backward()
    torch.optim.AdamW(model.parameters()).step()


def test_the_text_haystack_trains_on_training_files_and_scores_on_held_out_ones(monkeypatch) -> None:
    """`--filler text`: run_variant's training batches take their filler from the corpus's training files and the
    scored sequences from its validation files (the corpus splits by file); a 48-byte run of each sequence's filler
    is found in that split."""
    corpus = load_corpus(max_bytes=2_000_000)  # as run_variant loads it
    assert long_context.haystack("repeat", corpus.val) == "repeat"
    fillers = []

    def recording(*args, filler, **kwargs):
        fillers.append((kwargs.get("depth") is None, filler))  # training draws a depth per row; scoring puts it at 0
        return passkey_batch(*args, filler=filler, **kwargs)

    monkeypatch.setattr(long_context, "passkey_batch", recording)
    long_context.run_variant("SWA", tiny_args(filler="text"))
    for training, filler in fillers:
        assert torch.equal(filler, corpus.train if training else corpus.val)
    assert {training for training, _ in fillers} == {True, False}
    for split in (corpus.train, corpus.val):
        task = passkey_batch(4, 128, depth=0.0, digits=2, filler=split, seed=3)
        for row in task.tokens:
            run = bytes(row[40:88].tolist())  # past the needle at the start, before the query at the end
            assert run in bytes(split.tolist())


@pytest.mark.parametrize(("warmup", "expected"), [(None, 4), (7, 7)])
def test_the_pass_key_warm_up_is_a_fifth_of_the_steps_unless_given(monkeypatch, warmup, expected) -> None:
    warmups = []
    real_train = long_context.train

    def recording(*args, **kwargs):
        warmups.append(kwargs["warmup"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(long_context, "train", recording)
    long_context.run_variant("SWA", tiny_args(steps=20, warmup=warmup))
    assert warmups[0] == expected  # the pass-key run; the real-text copy's schedule follows --lm-steps
