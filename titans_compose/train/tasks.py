"""Synthetic long-context tasks at the byte level (vocabulary 256): pass-key retrieval and associative recall.

- :func:`passkey_batch`: a needle-in-a-haystack in the style of RULER's single-needle task (S-NIAH): filler text, a
  needle ``The pass key is 48213. `` at a chosen depth, then ``What is the pass key? `` and the answer digits, which
  end the sequence.
- :func:`mqar_batch`: multi-query associative recall (Zoology's MQAR): key-value pairs ``abc=123 ``, an optional
  gap of filler, then queries that repeat some of the keys; the values after the queried keys are the answers.

Both are built with tensor operations from one ``torch.Generator`` seed, so a batch is a function of its arguments.
Each returns a :class:`TaskBatch` whose ``answer_group`` marks the answer tokens; :func:`exact_match` scores a
model's logits on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from titans_compose.train.data import Batch, encode, random_windows

#: the classic pass-key filler (Mohtashami & Jaggi 2023; used by RULER's "repeat" haystack)
REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE_PREFIX = "The pass key is "
NEEDLE_SUFFIX = ". "
QUERY = "What is the pass key? "
DIGIT0 = ord("0")
LETTER_A = ord("a")
#: the largest key space MQAR samples distinct keys from (26 ** key_len)
MAX_KEY_SPACE = 1 << 20
#: the bytes of each task's batches besides the filler's
TASK_BYTES = {
    "passkey": NEEDLE_PREFIX + NEEDLE_SUFFIX + QUERY + "0123456789",
    "mqar": "abcdefghijklmnopqrstuvwxyz0123456789= ",
}

Filler = Literal["repeat", "digits"] | torch.Tensor
LossOn = Literal["answer", "all"]


@dataclass(frozen=True)
class TaskBatch(Batch):
    """A task batch: ``answer_group`` [B, T] numbers each answer's tokens (0, 1, ... per row) and is -1 elsewhere.

    ``needle_start`` [B] is where the pass-key needle begins (pass-key batches only).
    """

    answer_group: torch.Tensor | None = None
    needle_start: torch.Tensor | None = None


def passkey_min_len(digits: int) -> int:
    """The shortest pass-key sequence with ``digits`` answer digits (no filler)."""
    return len(NEEDLE_PREFIX) + digits + len(NEEDLE_SUFFIX) + len(QUERY) + digits


def filler_tokens(filler: Filler, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, length] filler: the repeated pass-key sentences at a random phase per row, random digits with about
    one byte in five a space (a haystack of distractor numbers), or random windows of a corpus byte tensor."""
    if isinstance(filler, torch.Tensor):
        return random_windows(filler, batch, length, gen)
    if filler == "repeat":
        text = encode(REPEAT_FILLER)
        phase = torch.randint(text.numel(), (batch, 1), generator=gen)
        return text[(phase + torch.arange(length)) % text.numel()]
    if filler == "digits":
        noise = torch.randint(10, (batch, length), generator=gen) + DIGIT0
        return noise.masked_fill(torch.rand(batch, length, generator=gen) < 0.2, ord(" "))
    raise ValueError(f"unknown filler {filler!r}: use 'repeat', 'digits' or a corpus byte tensor")


def max_token(task: str, filler: Filler) -> int:
    """The largest token id a ``task`` batch with ``filler`` can hold: a model's vocabulary must exceed it."""
    if task not in TASK_BYTES:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASK_BYTES)}")
    if isinstance(filler, torch.Tensor):
        filler_max = int(filler.max()) if filler.numel() else 0
    elif filler == "repeat":
        filler_max = max(REPEAT_FILLER.encode("utf-8"))
    elif filler == "digits":
        filler_max = ord("9")
    else:
        raise ValueError(f"unknown filler {filler!r}: use 'repeat', 'digits' or a corpus byte tensor")
    return max(filler_max, *TASK_BYTES[task].encode("utf-8"))


def check_vocabulary(vocab_size: int, top: int, data: str) -> None:
    """Raise ValueError unless a model with ``vocab_size`` tokens can take ``data``'s byte values (up to ``top``)."""
    if vocab_size <= top:
        raise ValueError(
            f"model.vocab_size is {vocab_size}, but the training data ({data}) hold byte values up to {top}: a "
            f"byte-level model needs a vocab_size above {top} (e.g. model.vocab_size: 256)"
        )


def _digits(values: torch.Tensor, width: int, base: int, first: int) -> torch.Tensor:
    """Integers [...] as ``width`` characters [..., width] in ``base`` (most significant first), offset by ``first``."""
    powers = base ** torch.arange(width - 1, -1, -1)
    return (values.unsqueeze(-1) // powers) % base + first


def _loss_mask(answer_group: torch.Tensor, loss_on: LossOn) -> torch.Tensor:
    if loss_on == "answer":
        return answer_group >= 0
    if loss_on == "all":
        return torch.ones_like(answer_group, dtype=torch.bool)
    raise ValueError(f"loss_on must be 'answer' or 'all', got {loss_on!r}")


def passkey_batch(
    batch: int,
    seq_len: int,
    *,
    depth: float | None = None,
    digits: int = 5,
    filler: Filler = "repeat",
    loss_on: LossOn = "answer",
    seed: int = 0,
) -> TaskBatch:
    """``batch`` pass-key sequences of exactly ``seq_len`` bytes with ``digits``-digit keys.

    ``depth`` in [0, 1] places the needle after that fraction of the filler (0: first, 1: just before the query);
    ``None`` draws a depth per row. The answer is the last ``digits`` tokens. ``loss_on='answer'`` puts the loss on
    the answer only, ``'all'`` on every token.
    """
    if batch < 1 or digits < 1:
        raise ValueError(f"need batch >= 1 and digits >= 1, got batch {batch}, digits {digits}")
    if seq_len < passkey_min_len(digits):
        raise ValueError(
            f"seq_len {seq_len} is too short: a {digits}-digit pass key needs at least {passkey_min_len(digits)} tokens"
        )
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    gen = torch.Generator().manual_seed(seed)
    key = _digits(torch.randint(10**digits, (batch,), generator=gen), digits, 10, DIGIT0)
    prefix, suffix = encode(NEEDLE_PREFIX).expand(batch, -1), encode(NEEDLE_SUFFIX).expand(batch, -1)
    needle = torch.cat([prefix, key, suffix], dim=1)
    tail = torch.cat([encode(QUERY).expand(batch, -1), key], dim=1)
    n_fill = seq_len - needle.shape[1] - tail.shape[1]
    fill = filler_tokens(filler, batch, n_fill, gen)
    fraction = torch.rand(batch, generator=gen) if depth is None else torch.full((batch,), depth)
    start = (fraction * n_fill).round().long()
    # The haystack: the needle's positions take the needle, the others the filler in order (masked assignment
    # fills row by row, and every row has exactly n_fill filler positions).
    offset = torch.arange(n_fill + needle.shape[1]) - start[:, None]
    inside = (offset >= 0) & (offset < needle.shape[1])
    haystack = torch.empty(batch, n_fill + needle.shape[1], dtype=torch.long)
    haystack[inside] = needle.flatten()
    haystack[~inside] = fill.flatten()
    tokens = torch.cat([haystack, tail], dim=1)
    answer_group = torch.full_like(tokens, -1)
    answer_group[:, -digits:] = 0
    return TaskBatch(tokens, _loss_mask(answer_group, loss_on), answer_group, start)


def mqar_len(pairs: int, queries: int, key_len: int = 2, value_len: int = 2) -> int:
    """An MQAR sequence's length without a gap: each pair and query is ``key=value `` (``key_len + value_len + 2``)."""
    return (pairs + queries) * (key_len + value_len + 2)


def mqar_batch(
    batch: int,
    *,
    pairs: int = 16,
    queries: int = 4,
    key_len: int = 2,
    value_len: int = 2,
    seq_len: int | None = None,
    filler: Filler = "repeat",
    loss_on: LossOn = "answer",
    seed: int = 0,
) -> TaskBatch:
    """``batch`` MQAR sequences: ``pairs`` distinct lower-case keys with random digit values, then ``queries`` of
    those keys (distinct, in random order) each followed by its value, the answer.

    With ``seq_len`` the gap between the pairs and the queries is filled with ``filler`` to make the sequence that
    long (the recall distance grows with it); without, there is no gap. Answer group ``i`` is the value of query
    ``i``.
    """
    if batch < 1 or key_len < 1 or value_len < 1 or not 1 <= queries <= pairs:
        raise ValueError(
            f"need batch, key_len, value_len >= 1 and 1 <= queries <= pairs, got batch {batch}, key_len {key_len}, "
            f"value_len {value_len}, pairs {pairs}, queries {queries}"
        )
    space = 26**key_len
    if space > MAX_KEY_SPACE or pairs > space:
        raise ValueError(f"{pairs} distinct keys of {key_len} letters: need pairs <= 26**key_len <= {MAX_KEY_SPACE}")
    base = mqar_len(pairs, queries, key_len, value_len)
    gap = 0 if seq_len is None else seq_len - base
    if gap < 0:
        raise ValueError(f"seq_len {seq_len} is too short: {pairs} pairs and {queries} queries need {base} tokens")
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(batch, space, generator=gen).topk(pairs, dim=1).indices
    values = torch.randint(10**value_len, (batch, pairs), generator=gen)
    asked = torch.rand(batch, pairs, generator=gen).topk(queries, dim=1).indices

    def segments(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        eq = torch.full((*k.shape, 1), ord("="))
        space_ = torch.full((*k.shape, 1), ord(" "))
        return torch.cat([_digits(k, key_len, 26, LETTER_A), eq, _digits(v, value_len, 10, DIGIT0), space_], dim=-1)

    context = segments(keys, values).flatten(1)
    probe = segments(keys.gather(1, asked), values.gather(1, asked))  # [B, Q, S]
    tokens = torch.cat([context, filler_tokens(filler, batch, gap, gen), probe.flatten(1)], dim=1)
    group = torch.full(probe.shape, -1)
    value_cols = slice(key_len + 1, key_len + 1 + value_len)
    group[:, :, value_cols] = torch.arange(queries)[:, None]
    answer_group = torch.cat([torch.full((batch, context.shape[1] + gap), -1), group.flatten(1)], dim=1)
    return TaskBatch(tokens, _loss_mask(answer_group, loss_on), answer_group)


def exact_match(logits: torch.Tensor, batch: TaskBatch) -> float:
    """The fraction of answers whose every token is the argmax of the logits one position before it.

    Scored teacher-forced. For a pass key, whose answer ends the sequence, this equals greedy decoding's exact
    match: greedy decoding emits exactly the teacher-forced argmaxes until its first wrong digit, so it gets the
    whole key right if and only if every teacher-forced argmax is right.
    """
    return exact_match_of(logits.argmax(-1), batch)


def exact_match_of(predicted: torch.Tensor, batch: TaskBatch) -> float:
    """:func:`exact_match` from the predicted next token at every position, ``predicted`` [B, T] (the logits'
    argmax: what a context-parallel evaluation gathers from its ranks instead of their logits)."""
    if batch.answer_group is None:
        raise ValueError("the batch has no answers to score")
    group = batch.answer_group[:, 1:].to(predicted.device)
    wrong = (predicted[:, :-1] != batch.tokens[:, 1:].to(predicted.device)) & (group >= 0)
    n_groups = int(group.max()) + 1
    if n_groups <= 0:
        raise ValueError("the batch has no answers to score")
    slot = torch.where(group >= 0, group, n_groups)  # non-answer positions go to a spare column, dropped below
    errors = torch.zeros(group.shape[0], n_groups + 1, dtype=torch.long, device=predicted.device)
    errors.scatter_add_(1, slot, wrong.long())
    present = torch.zeros_like(errors, dtype=torch.bool).scatter_(1, slot, True)
    scored = present[:, :n_groups]
    return float(((errors[:, :n_groups] == 0) & scored).sum() / scored.sum())
