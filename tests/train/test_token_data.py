"""Token files (flat uint16 / uint32 ids with a JSON sidecar), `data tokenize`, `train --tokens`, and packed documents:
a model given document boundaries computes what it computes on each document alone."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from tests.conftest import SPECS
from tests.helpers import VARIANTS, tokens
from tests.helpers import build_model as build
from titans_compose.train import Batch
from titans_compose.train.data import DataError
from titans_compose.train.loop import batch_logits
from titans_compose.train.tokens import document_bounds, open_tokens, split_samplers, write_tokens

np = pytest.importorskip("numpy")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("vocab", "dtype"), [(300, "uint16"), (70_000, "uint32")])
def test_a_token_file_round_trips_through_numpy_memmap(tmp_path, vocab, dtype):
    ids = np.random.default_rng(0).integers(0, vocab, 1000)
    written = write_tokens(tmp_path / "t.bin", ids, vocab_size=vocab, tokenizer="tok.json", separator=0)
    assert isinstance(written.ids, np.memmap) and written.ids.dtype == np.dtype(dtype)
    assert (tmp_path / "t.bin").stat().st_size == 1000 * np.dtype(dtype).itemsize
    assert np.array_equal(np.fromfile(tmp_path / "t.bin", dtype=dtype), ids)  # the layout numpy's tofile writes
    meta = json.loads((tmp_path / "t.bin.json").read_text())
    assert meta == {"format": "titans_compose.tokens", "version": 1, "dtype": dtype, "vocab_size": vocab,
                    "tokens": 1000, "tokenizer": "tok.json", "separator": 0}  # fmt: skip
    again = open_tokens(tmp_path / "t.bin")
    assert again.max_id() == ids.max() and again.separator == 0 and len(again) == 1000


def test_documents_stream_to_disk_and_a_bad_one_leaves_no_file(tmp_path):
    parts = [np.array([5, 1, 2]), np.array([5, 3]), np.array([5])]
    file = write_tokens(tmp_path / "t.bin", iter(parts), vocab_size=6, separator=5)
    assert file.ids.tolist() == [5, 1, 2, 5, 3, 5] and len(file) == 6
    with pytest.raises(DataError, match=r"ids in \[0, 6\)"):
        write_tokens(tmp_path / "u.bin", iter([np.array([1]), np.array([6])]), vocab_size=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin", "t.bin.json"]  # no u.bin, no temporary


def test_bad_token_files_are_named(tmp_path):
    path = tmp_path / "t.bin"
    with pytest.raises(DataError, match=r"ids in \[0, 10\)"):
        write_tokens(path, np.array([3, 10]), vocab_size=10)
    np.arange(10, dtype=np.uint16).tofile(path)
    with pytest.raises(DataError, match=r"sidecar .*t\.bin\.json is missing"):
        open_tokens(path)
    write_tokens(path, np.arange(10), vocab_size=10)
    (tmp_path / "t.bin").write_bytes(b"\0" * 7)
    with pytest.raises(DataError, match="7 bytes do not hold the 10 uint16 tokens"):
        open_tokens(path)
    (tmp_path / "t.bin.json").write_text(json.dumps({"format": "titans_compose.tokens", "dtype": "int8"}))
    with pytest.raises(DataError, match="dtype must be one of uint16, uint32"):
        open_tokens(path)


def test_samplers_split_off_a_validation_tail_and_mark_documents(tmp_path):
    ids = np.arange(200) % 50
    ids[::37] = 0  # separators
    file = write_tokens(tmp_path / "t.bin", ids, vocab_size=50, separator=0)
    train, val = split_samplers(file, 3, 16, seed=1, val_percent=10, separator=0)
    assert (train.start, train.end, val.start, val.end) == (0, 180, 180, 200)
    batch = train(5)
    assert torch.equal(batch.tokens, train(5).tokens) and batch.tokens.shape == (3, 16)
    flat = batch.tokens.flatten()
    expected = sorted({0, 16, 32, 48, *(i for i in range(48) if flat[i] == 0)})
    assert batch.cu_seqlens.tolist() == expected
    assert int(val(0).tokens.max()) < 50
    assert document_bounds(batch.tokens, None) is None


@pytest.mark.parametrize("kind", VARIANTS)
def test_packed_documents_equal_the_documents_run_one_by_one(tmp_path, kind):
    """Each block kind: logits of one row with boundaries equal each document run alone from a fresh state (float64,
    within 1e-12), documents of lengths that cut chunks, MAC segments and the attention window; without the
    boundaries the later documents differ (the state would carry over)."""
    model, _ = build(tmp_path, kind)
    toks = tokens(1, 29)
    bounds = [0, 6, 7, 19, 29]
    packed = model(toks, cu_seqlens=torch.tensor(bounds)).logits
    alone = torch.cat([model(toks[:, a:b]).logits for a, b in itertools.pairwise(bounds)], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(model(toks).logits[:, 7:], packed[:, 7:])


@pytest.mark.parametrize("bounds", [[0, 5, 12, 15, 24], [0, 5, 12, 17, 24], [0, 12, 24]])
def test_packed_batches_equal_their_documents_run_one_by_one(tmp_path, bounds):
    """A batch of 2 rows of 12 with boundaries over the rows laid end to end (every row start is one): documents of
    distinct lengths, of equal lengths (run together as the rows of one call), and no separator at all."""
    model, _ = build(tmp_path, "mac")
    toks = tokens(2, 12)
    logits = batch_logits(model, Batch(toks, cu_seqlens=torch.tensor(bounds)))
    flat = toks.reshape(1, 24)
    expected = torch.cat([model(flat[:, a:b]).logits for a, b in itertools.pairwise(bounds)], 1).view(2, 12, -1)
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"cu_seqlens must run from 0 to 24"):
        batch_logits(model, Batch(toks, cu_seqlens=torch.tensor([0, 12])))


def test_micro_batches_keep_their_rows_document_boundaries(tmp_path):
    """Splitting a packed batch into micro-batches (accumulation, ranks) keeps each part's own boundaries, shifted to
    its first row: every part's logits are those rows of the whole batch's."""
    from titans_compose.train.distributed import rows

    model, _ = build(tmp_path, "mag")
    toks = tokens(4, 6)
    whole = Batch(toks, cu_seqlens=torch.tensor([0, 4, 6, 12, 14, 18, 24]))
    expected = batch_logits(model, whole)
    for start, stop, bounds in [(0, 2, [0, 4, 6, 12]), (2, 4, [0, 2, 6, 12]), (1, 3, [0, 6, 8, 12])]:
        part = rows(whole, start, stop)
        assert part.cu_seqlens.tolist() == bounds
        torch.testing.assert_close(batch_logits(model, part), expected[start:stop], rtol=1e-12, atol=1e-12)


def test_document_boundaries_are_checked(tmp_path):
    model, _ = build(tmp_path, "lmm")
    with pytest.raises(ValueError, match="batch of one row"):
        model(tokens(2, 8), cu_seqlens=[0, 8])
    with pytest.raises(ValueError, match="from 0 to the sequence length"):
        model(tokens(1, 8), cu_seqlens=[0, 5])
    with pytest.raises(ValueError, match="must not decrease"):
        model(tokens(1, 8), cu_seqlens=[0, 5, 3, 8])
    with pytest.raises(ValueError, match="pass no state"):
        model(tokens(1, 8), state=model(tokens(1, 2)).state, cu_seqlens=[0, 8])


# --- the command line ---------------------------------------------------------------------------------------------


@pytest.fixture
def tokenizer_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<unk>"])
    tok.train_from_iterator(["the memory learns at test time " * 20, "a quick brown fox " * 20], trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_tokenize_then_train(runner, tmp_path, tokenizer_file):
    from tokenizers import Tokenizer

    from titans_compose.cli.main import cli

    texts = []
    for i in range(3):
        texts.append(tmp_path / f"doc{i}.txt")
        texts[-1].write_text(f"document {i}: the memory learns at test time, a quick brown fox. " * 30)
    out = tmp_path / "corpus.bin"
    result = runner.invoke(cli, ["data", "tokenize", *map(str, texts), "--tokenizer", str(tokenizer_file), "-o",
                                 str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    file = open_tokens(out)
    tok = Tokenizer.from_file(str(tokenizer_file))
    sep = tok.token_to_id("<|endoftext|>")
    assert file.separator == sep and file.vocab_size == tok.get_vocab_size()
    expected = [sep, *tok.encode(texts[0].read_text()).ids]
    assert file.ids[: len(expected)].tolist() == expected
    assert int((np.asarray(file.ids) == sep).sum()) == 3

    small = ["--seq-len", "32", "--batch", "2", "--steps", "2", "--no-progress", "--eval-batches", "1"]
    sets = ["--set", "model.dim=32", "--set", "memory.head_dim=16", "--set", "blocks.0.repeat=1"]
    spec = str(SPECS / "titans_mac_small.yaml")
    too_small = [*sets, "--set", "model.vocab_size=20"]
    result = runner.invoke(cli, ["train", spec, "--tokens", str(out), "-o", str(tmp_path / "r"), *small, *too_small])
    assert result.exit_code == 1 and "model.vocab_size is 20, but the token file" in result.output
    assert f"--set model.vocab_size={file.vocab_size}" in result.output
    sets += ["--set", f"model.vocab_size={file.vocab_size}"]
    result = runner.invoke(cli, ["train", spec, "--tokens", str(out), "-o", str(tmp_path / "r"), *small, *sets])
    assert result.exit_code == 0, result.output
    final = json.loads((tmp_path / "r" / "metrics.json").read_text())["final"]
    assert set(final) == {"val_loss", "val_bits_per_token"}


def test_tokenize_errors_name_the_option(runner, tmp_path, tokenizer_file):
    from titans_compose.cli.main import cli

    text = tmp_path / "a.txt"
    text.write_text("hello")
    base = ["data", "tokenize", str(text), "--tokenizer", str(tokenizer_file), "-o", str(tmp_path / "o.bin")]
    result = runner.invoke(cli, [*base, "--separator", "<nope>"])
    assert result.exit_code == 2 and "no token '<nope>'" in result.output
    result = runner.invoke(cli, [*base, "--separator", "none"])
    assert result.exit_code == 0 and open_tokens(tmp_path / "o.bin").separator is None
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    result = runner.invoke(cli, ["data", "tokenize", str(text), "--tokenizer", str(bad), "-o", str(tmp_path / "x.bin")])
    assert result.exit_code == 2 and "not a tokenizers tokenizer file" in result.output


def test_tokenize_without_the_library_says_how_to_install_it(runner, tmp_path, monkeypatch):
    import sys

    from titans_compose.cli.main import cli

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if it were not installed
    text = tmp_path / "a.txt"
    text.write_text("hello")
    (tmp_path / "t.json").write_text("{}")
    result = runner.invoke(cli, ["data", "tokenize", str(text), "--tokenizer", str(tmp_path / "t.json"), "-o",
                                 str(tmp_path / "o.bin")])  # fmt: skip
    assert result.exit_code == 1 and "pip install tokenizers" in result.output


def test_sweep_keys_of_earlier_results_are_unchanged_by_the_new_train_options():
    """A sweep point's key hashes its train options; the options added here (tokens, separator, precision) are left
    out at their defaults, so results recorded before they existed keep their keys, and set they change the key."""
    from titans_compose.registry import new_registry
    from titans_compose.spec import load_spec
    from titans_compose.sweep.plan import LATER_TRAIN_DEFAULTS, point_key

    loaded = load_spec(SPECS / "titans_mac_small.yaml", registry=new_registry())
    before = {"task": "lm", "steps": 10, "lr": 0.001}
    now = {**before, **LATER_TRAIN_DEFAULTS}
    assert point_key(loaded, 0, now) == point_key(loaded, 0, before)
    assert point_key(loaded, 0, {**now, "precision": "bf16"}) != point_key(loaded, 0, before)


def test_train_token_options_name_their_conflicts(runner, tmp_path):
    from titans_compose.cli.main import cli

    write_tokens(tmp_path / "t.bin", np.arange(400) % 7, vocab_size=7)
    spec = str(SPECS / "titans_mac_small.yaml")
    cases = [
        (["--separator", "3"], "'--separator': a separator applies to a token file"),
        (["--tokens", str(tmp_path / "t.bin"), "--task", "passkey"], "'--tokens': a token file is language-model"),
        (["--tokens", str(tmp_path / "t.bin"), "--separator", "9"], "separator id 9 is not below"),
        (["--tokens", str(tmp_path / "t.bin"), "--seq-len", "390"], "cannot give a training part and a validation"),
    ]
    for args, message in cases:
        result = runner.invoke(cli, ["train", spec, "-o", str(tmp_path / "run"), "--no-progress", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)


class ReadRecorder:
    """A token file's ids that record which windows are read."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids, self.reads = ids, []

    def __getitem__(self, where: slice) -> np.ndarray:
        self.reads.append((where.start, where.stop))
        return self.ids[where]

    def __len__(self) -> int:
        return len(self.ids)


@pytest.mark.parametrize("world_size, accumulate", [(1, 3), (2, 1), (3, 2)])
def test_each_rank_reads_only_its_rows_and_gets_what_the_whole_batch_gives_it(tmp_path, world_size, accumulate):
    """A token file's sampler asked for one rank's rows reads only those windows, and its micro-batches (documents'
    boundaries included) equal the ones cut from the whole global batch; the same for text windows."""
    from dataclasses import replace

    from titans_compose.train.data import WindowSampler
    from titans_compose.train.distributed import World, micro_batches, step_batches
    from titans_compose.train.tokens import TokenSampler

    ids = np.arange(500) % 50
    ids[::23] = 0
    file = write_tokens(tmp_path / "t.bin", ids, vocab_size=50, separator=0)
    rows = 6 * world_size
    train, _ = split_samplers(file, rows, 16, seed=3, val_percent=10, separator=0)
    text = WindowSampler(torch.arange(400, dtype=torch.uint8), rows, 16, seed=3)
    for rank in range(world_size):
        world = World(rank, world_size)
        recorder = ReadRecorder(file.ids)
        reading = TokenSampler(
            replace(file, ids=recorder), train.start, train.end, rows, 16, seed=3, stream="train", separator=0
        )
        for sampler, reference in ((reading, train), (text, text)):
            mine = step_batches(sampler, 7, world, accumulate)
            cut = micro_batches(reference(7), world, accumulate)
            assert len(mine) == len(cut) == accumulate
            for got, want in zip(mine, cut, strict=True):
                assert torch.equal(got.tokens, want.tokens)
                assert (got.cu_seqlens is None) == (want.cu_seqlens is None)
                assert got.cu_seqlens is None or torch.equal(got.cu_seqlens, want.cu_seqlens)
        assert len(recorder.reads) == rows // world_size  # only this rank's windows
