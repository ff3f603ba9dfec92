"""Synthetic tasks: pass-key needle placement and answers, MQAR pairs and queries, determinism, the evaluator."""

from __future__ import annotations

import re

import pytest
import torch

from titans_compose.train.data import decode, encode
from titans_compose.train.tasks import (
    NEEDLE_PREFIX,
    QUERY,
    TaskBatch,
    check_vocabulary,
    exact_match,
    max_token,
    mqar_batch,
    mqar_len,
    passkey_batch,
    passkey_min_len,
)


def oracle_logits(batch: TaskBatch) -> torch.Tensor:
    """Logits whose argmax at every position is the next token: a perfect predictor."""
    logits = torch.zeros(*batch.tokens.shape, 256)
    logits[:, :-1].scatter_(2, batch.tokens[:, 1:, None], 1.0)
    return logits


def off_by_one_logits(batch: TaskBatch) -> torch.Tensor:
    """A predictor that is always wrong: the next token plus one."""
    logits = torch.zeros(*batch.tokens.shape, 256)
    logits[:, :-1].scatter_(2, (batch.tokens[:, 1:, None] + 1) % 256, 1.0)
    return logits


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("filler", ["repeat", "digits", "corpus"])
def test_passkey_needle_at_depth_and_answer_decodes(depth: float, filler: str) -> None:
    seq_len, digits = 300, 6
    fill = encode("lorem ipsum dolor sit amet " * 40).to(torch.uint8) if filler == "corpus" else filler
    batch = passkey_batch(4, seq_len, depth=depth, digits=digits, filler=fill, seed=7)
    assert batch.tokens.shape == (4, seq_len) and batch.tokens.dtype == torch.long
    n_fill = seq_len - passkey_min_len(digits)
    assert batch.needle_start.tolist() == [round(depth * n_fill)] * 4
    for row, start in zip(batch.tokens, batch.needle_start.tolist(), strict=True):
        text = decode(row)
        assert text[start:].startswith(NEEDLE_PREFIX)
        key = text[start + len(NEEDLE_PREFIX) : start + len(NEEDLE_PREFIX) + digits]
        assert key.isdigit() and len(key) == digits
        assert text.endswith(QUERY + key)
        assert decode(row[batch.answer_group[0] >= 0]) == key  # the answer tokens are the key's digits
    assert batch.loss_mask.sum().item() == 4 * digits and torch.equal(batch.loss_mask, batch.answer_group >= 0)


def test_passkey_is_deterministic_and_depth_varies_without_a_given_depth() -> None:
    a, b = passkey_batch(8, 200, seed=3), passkey_batch(8, 200, seed=3)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, passkey_batch(8, 200, seed=4).tokens)
    assert len(set(a.needle_start.tolist())) > 1
    assert passkey_batch(2, 200, loss_on="all").loss_mask.all()


def test_passkey_minimum_length_and_errors() -> None:
    shortest = passkey_batch(2, passkey_min_len(5), digits=5, depth=0.5)
    assert decode(shortest.tokens[0]).startswith(NEEDLE_PREFIX)
    with pytest.raises(ValueError, match="too short"):
        passkey_batch(2, passkey_min_len(5) - 1)
    with pytest.raises(ValueError, match="depth"):
        passkey_batch(2, 100, depth=1.5)
    with pytest.raises(ValueError, match="unknown filler"):
        passkey_batch(2, 100, filler="nope")  # type: ignore[arg-type]


def test_mqar_queries_ask_stored_pairs() -> None:
    pairs, queries, seq_len = 12, 5, 400
    batch = mqar_batch(3, pairs=pairs, queries=queries, key_len=3, value_len=2, seq_len=seq_len, seed=1)
    assert batch.tokens.shape == (3, seq_len)
    for row, groups in zip(batch.tokens, batch.answer_group, strict=True):
        text = decode(row)
        stored = re.findall(r"([a-z]{3})=(\d{2}) ", text[: pairs * 7])
        assert len(stored) == pairs and len({k for k, _ in stored}) == pairs  # distinct keys
        asked = re.findall(r"([a-z]{3})=(\d{2}) ", text[-queries * 7 :])
        assert len(asked) == queries and len({k for k, _ in asked}) == queries
        assert all(dict(stored)[k] == v for k, v in asked)  # each query's answer is the stored value
        answers = [decode(row[groups == i]) for i in range(queries)]
        assert answers == [v for _, v in asked]
    assert torch.equal(batch.tokens, mqar_batch(3, pairs=12, queries=5, key_len=3, seq_len=400, seed=1).tokens)
    assert mqar_batch(2, pairs=4, queries=2).tokens.shape == (2, mqar_len(4, 2))


def test_mqar_errors() -> None:
    with pytest.raises(ValueError, match="too short"):
        mqar_batch(1, pairs=8, queries=2, seq_len=10)
    with pytest.raises(ValueError, match="queries <= pairs"):
        mqar_batch(1, pairs=2, queries=3)
    with pytest.raises(ValueError, match="distinct keys"):
        mqar_batch(1, pairs=30, queries=2, key_len=1)


@pytest.mark.parametrize(
    "make",
    [lambda: passkey_batch(6, 120, seed=2), lambda: mqar_batch(6, pairs=8, queries=4, seq_len=100, seed=2)],
)
def test_exact_match_oracle_and_wrong(make) -> None:
    batch = make()
    assert exact_match(oracle_logits(batch), batch) == 1.0
    assert exact_match(off_by_one_logits(batch), batch) == 0.0


def test_exact_match_needs_every_answer_token() -> None:
    batch = mqar_batch(4, pairs=8, queries=4, seed=0)
    logits = oracle_logits(batch)
    # break the last digit of query 1's value in row 0: one of 16 answers becomes wrong
    last = int((batch.answer_group[0] == 1).nonzero().max())
    logits[0, last - 1] = 0.0
    logits[0, last - 1, (batch.tokens[0, last] + 1) % 256] = 1.0
    assert exact_match(logits, batch) == pytest.approx(15 / 16)
    passkey = passkey_batch(4, 100, seed=0)
    logits = oracle_logits(passkey)
    logits[1, -3] = 0.0  # row 1's next-to-last digit is predicted as token 0
    assert exact_match(logits, passkey) == 0.75


@pytest.mark.parametrize("filler", ["repeat", "digits", encode("text with a tilde ~ in it " * 20)])
def test_max_token_bounds_every_batch(filler) -> None:
    """No batch of a task holds a token above max_token, and the bound is reached (it is not loose)."""
    seen = {"passkey": 0, "mqar": 0}
    for seed in range(20):
        seen["passkey"] = max(
            seen["passkey"], int(passkey_batch(4, 96, digits=3, filler=filler, seed=seed).tokens.max())
        )
        mqar = mqar_batch(4, pairs=26, queries=4, key_len=1, seq_len=200, filler=filler, seed=seed)
        seen["mqar"] = max(seen["mqar"], int(mqar.tokens.max()))
    for task, top in seen.items():
        assert top == max_token(task, filler)
        check_vocabulary(top + 1, top, task)
        with pytest.raises(ValueError, match=f"model.vocab_size is {top}, but the training data \\({task}\\)"):
            check_vocabulary(top, top, task)
