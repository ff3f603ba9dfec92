"""Hugging Face interoperability (titans_compose.hf, the ``hf`` extra): exports load through transformers' Auto
classes with the source model's logits, stream through a TitansCache, generate what the project's generate makes,
train with transformers' Trainer, and evaluate in lm-eval on a local task with the numbers a direct computation
gives. Skipped, with the reason, where the extra is not installed."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# transformers and datasets read these when first imported: nothing is downloaded, nothing is cached outside the
# test session (remote-code modules and dataset caches included)
_CACHE = tempfile.mkdtemp(prefix="titans-compose-test-hf-")
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HOME": _CACHE,
    "HF_MODULES_CACHE": os.path.join(_CACHE, "modules"),
    "HF_DATASETS_CACHE": os.path.join(_CACHE, "datasets"),
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)

pytest.importorskip("transformers", reason='the hf extra is not installed (pip install -e ".[hf]")')

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import titans_compose  # noqa: E402
from tests.conftest import ROOT, SPECS, shipped_specs  # noqa: E402
from titans_compose.cli.main import cli  # noqa: E402
from titans_compose.hf import ByteTokenizer, TitansCache, TitansComposeConfig, TitansComposeForCausalLM  # noqa: E402
from titans_compose.hf.export import HFExportError, export_hf  # noqa: E402
from titans_compose.hf.modeling import CACHE_FIELD  # noqa: E402
from titans_compose.manifest import sha256  # noqa: E402
from titans_compose.train.data import decode, encode  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "name": "tiny",
    "model": {"vocab_size": 256, "dim": 16},
    "memory": {"heads": 2, "head_dim": 8, "depth": 2, "expansion": 2, "chunk_size": 4},
    "update": {"grad_clip": 1.0},  # without the clip these random tiny memories diverge within 64 tokens
    "projections": {"conv_kernel": 3},
    "persistent": {"tokens": 2},
    "attention": {"heads": 2, "window": 5},
    "mac": {"segment": 8},
    "mlp": {"kind": "swiglu", "expansion": 2},
}
KINDS = ["mac", "mag", "mal", "lmm", "attention"]
#: the top-level shipped specs run in the fast subset; the ablations (small variations of the MAC spec) are slow
FAST_SPECS = [p for p in shipped_specs() if p.parent == SPECS]


def tiny_spec(tmp_path, kind: str) -> str:
    path = tmp_path / f"tiny_{kind}.yaml"
    path.write_text(yaml.safe_dump({**TINY, "blocks": [{"kind": kind, "repeat": 2}]}))
    return str(path)


def cache_of(output):
    """The cache a forward returned (transformers releases name the output field ``cache`` or
    ``past_key_values``)."""
    return getattr(output, CACHE_FIELD)


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """kind -> (the built module, its --format hf export directory), made once for the module."""
    root = tmp_path_factory.mktemp("tiny-hf")
    made = {}
    for kind in KINDS:
        spec = tiny_spec(root, kind)
        export_hf(spec, root / kind)
        made[kind] = (titans_compose.build(spec, smoke=False).module.eval(), root / kind)
    return made


def spec_param(path):
    marks = [] if path in FAST_SPECS else [pytest.mark.slow]
    return pytest.param(path, id=path.relative_to(SPECS).as_posix(), marks=marks)


@pytest.mark.parametrize("spec", [spec_param(p) for p in shipped_specs()])
def test_auto_classes_load_an_export_of_every_shipped_spec_with_identical_logits(tmp_path, runner, spec):
    out = tmp_path / "hf"
    result = runner.invoke(cli, ["export", str(spec), "--format", "hf", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "AutoModelForCausalLM.from_pretrained" in result.output
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer_config.json",
        "titans_compose_hf.py",
    }
    source = titans_compose.build(spec, smoke=False).module.eval()
    config = AutoConfig.from_pretrained(out)
    assert isinstance(config, TitansComposeConfig) and config.tokenizer == {"kind": "bytes"}
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(model, TitansComposeForCausalLM)
    toks = tokens(2, 37)
    with torch.no_grad():
        assert torch.equal(model(toks).logits, source(toks).logits)
    assert isinstance(AutoTokenizer.from_pretrained(out), ByteTokenizer)


@pytest.mark.parametrize("spec", FAST_SPECS, ids=lambda p: p.stem)
def test_generate_equals_the_projects_generate_and_the_argmax_of_a_full_forward(tmp_path, spec):
    """Greedy decoding through transformers' generate (one token per step from the TitansCache) picks exactly what
    TitansLM.generate picks, and what a full forward over the sequence so far picks at every step."""
    export_hf(spec, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = tokens(2, 9, seed=3)
    ours = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, model.model.generate(prompt, 10))
    with torch.no_grad():
        recomputed = model(ours[:, :-1]).logits[:, prompt.shape[1] - 1 :].argmax(-1)
    assert torch.equal(ours[:, prompt.shape[1] :], recomputed)


@pytest.mark.parametrize("kind", KINDS)
def test_the_cache_streams_like_one_call(tiny_exports, kind):
    """Pieces of 5, 1, 1 and 6 tokens through forward with the returned cache give one call's logits (float64:
    1e-10 covers summation order), and the cache counts the tokens seen."""
    _, directory = tiny_exports[kind]
    model = AutoModelForCausalLM.from_pretrained(directory).double().eval()
    toks = tokens(2, 13, seed=4)
    with torch.no_grad():
        full = model(toks).logits
        cache, pieces, start = None, [], 0
        for n in (5, 1, 1, 6):
            mask = torch.ones(2, start + n, dtype=torch.long)
            out = model(toks[:, start : start + n], attention_mask=mask, cache=cache, use_cache=True)
            assert isinstance(cache_of(out), TitansCache) and (cache is None or cache_of(out) is cache)
            cache, start = cache_of(out), start + n
            pieces.append(out.logits)
            assert cache.get_seq_length() == start
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-10


def test_labels_give_the_next_token_loss_with_ignored_positions(tiny_exports):
    _, directory = tiny_exports["mag"]
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    toks = tokens(2, 12, seed=5)
    labels = toks.clone()
    labels[0, 3:6] = -100
    with torch.no_grad():
        out = model(toks, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 256)
    targets = labels[:, 1:].reshape(-1)
    kept = targets != -100
    want = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    assert kept.sum() == 22 - 3 and torch.allclose(out.loss, want, rtol=1e-6, atol=0)
    assert torch.equal(model(toks, labels=toks, use_cache=False).logits, out.logits)


def test_a_masked_position_is_left_out_of_its_rows_stream(tiny_exports):
    """Each row's stream is its unmasked tokens: left padding, right padding and a gap give, at the unmasked
    positions, the logits of that row alone, unpadded (float64, 1e-10: other shapes sum in another order), and zero
    logits where masked; the per-row cache continues each row exactly."""
    _, directory = tiny_exports["mac"]
    model = AutoModelForCausalLM.from_pretrained(directory).double().eval()
    toks = tokens(3, 10, seed=6)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    mask[2, 3:5] = 0  # a gap
    more = tokens(3, 2, seed=7)
    with torch.no_grad():
        out = model(toks, attention_mask=mask)
        nxt = model(more, attention_mask=torch.cat([mask, torch.ones(3, 2, dtype=torch.long)], 1), cache=cache_of(out))
        assert cache_of(out).get_seq_length() == 12 and len(cache_of(out).rows) == 3
        for row in range(3):
            keep = mask[row].bool()
            alone = model(torch.cat([toks[row, keep], more[row]])[None]).logits[0]
            assert (out.logits[row, keep] - alone[: int(keep.sum())]).abs().max() < 1e-10
            assert (nxt.logits[row] - alone[int(keep.sum()) :]).abs().max() < 1e-10
            assert not out.logits[row, ~keep].any()


def test_batched_generation_with_left_padding_equals_each_row_alone(tiny_exports):
    _, directory = tiny_exports["mag"]
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts = ["def memory(", "x", "Titans learn at test time"]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=7, do_sample=False)
    width = batch.input_ids.shape[1]
    for row, prompt in enumerate(prompts):
        alone = model.model.generate(encode(prompt)[None], 7)[0, -7:]
        assert torch.equal(out[row, width:], alone), prompt


def test_what_transformers_cannot_do_with_these_models_is_refused(tiny_exports):
    _, directory = tiny_exports["lmm"]
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    toks = tokens(2, 10, seed=6)
    gap = torch.ones(2, 10, dtype=torch.long)
    gap[1, 7:] = 0
    with torch.no_grad():
        cache = cache_of(model(toks[:, :4]))
        with pytest.raises(ValueError, match="ran as one batch"):
            model(toks[:, 4:], attention_mask=gap, cache=cache)
        with pytest.raises(ValueError, match="expected \\[2, 10\\]"):
            model(toks[:, 4:], attention_mask=gap[:, :7], cache=cache_of(model(toks[:, :4])))
        with pytest.raises(ValueError, match="inputs_embeds"):
            model(inputs_embeds=torch.zeros(2, 3, 16))
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(toks, max_new_tokens=2, num_beams=2, do_sample=False)


def test_the_byte_tokenizer_is_the_projects_byte_encoding(tiny_exports):
    tokenizer = AutoTokenizer.from_pretrained(tiny_exports["mac"][1])
    text = "Titans: é, ü, 漢字, 🙂 and a NUL \x00 byte"
    ids = tokenizer(text).input_ids
    assert ids == encode(text).tolist()
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    broken = torch.tensor([104, 195, 40, 255, 105])  # invalid UTF-8: replaced, as the project's decode does
    assert tokenizer.decode(broken.tolist()) == decode(broken)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0 and len(tokenizer) == 256


def test_exports_of_a_build_and_of_a_training_run(tmp_path, runner):
    """A build directory and an exported artifact export their weights; a `train` run exports its newest
    checkpoint's weights, and a run without a checkpoint is refused, saying so."""
    spec = tiny_spec(tmp_path, "mag")
    built = titans_compose.build(spec, output_dir=tmp_path / "build", seed=3, smoke=False)
    export_hf(tmp_path / "build", tmp_path / "from-build")
    toks = tokens(1, 11)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "from-build").eval()
    with torch.no_grad():
        assert torch.equal(model(toks).logits, built.module.eval()(toks).logits)
    assert model.config.seed == 3
    assert runner.invoke(cli, ["export", str(tmp_path / "build"), "-o", str(tmp_path / "artifact")]).exit_code == 0
    export_hf(tmp_path / "artifact", tmp_path / "from-artifact")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "from-artifact").eval()
    with torch.no_grad():
        assert torch.equal(model(toks).logits, built.module(toks).logits)

    text = tmp_path / "text.txt"
    text.write_text("the memory learns at test time. " * 40)
    args = ["train", spec, "--data", str(text), "--steps", "3", "--batch", "2", "--seq-len", "16"]
    args += ["--eval-every", "3", "--eval-batches", "1", "--lr", "0.01", "--no-progress", "-o", str(tmp_path / "run")]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    shutil.copytree(tmp_path / "run", tmp_path / "run-without-checkpoint")
    shutil.rmtree(tmp_path / "run-without-checkpoint" / "checkpoints")
    with pytest.raises(HFExportError, match="training run without a usable checkpoint"):
        export_hf(tmp_path / "run-without-checkpoint", tmp_path / "none")
    result = runner.invoke(cli, ["export", str(tmp_path / "run"), "--format", "hf", "-o", str(tmp_path / "from-run")])
    assert result.exit_code == 0, result.output
    from titans_compose.train.checkpoint import read_checkpoint

    record, tensors = read_checkpoint(tmp_path / "run" / "checkpoints")
    trained = titans_compose.load_build(tmp_path / "run" / "build").module.eval()
    initial = {k: v.clone() for k, v in trained.state_dict().items()}
    trained.load_state_dict({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "from-run").eval()
    assert record["step"] == 3
    assert not all(torch.equal(initial[k], v) for k, v in model.model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(toks).logits, trained(toks).logits)


def test_export_refuses_a_directory_that_is_not_an_export_and_a_changed_source(tmp_path, runner):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    spec = tiny_spec(tmp_path, "lmm")
    result = runner.invoke(cli, ["export", spec, "--format", "hf", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "holds no titans_compose Hugging Face export" in result.output
    assert runner.invoke(cli, ["export", spec, "--format", "hf", "-o", str(tmp_path / "ok")]).exit_code == 0
    again = runner.invoke(cli, ["export", spec, "--format", "hf", "-o", str(tmp_path / "ok"), "--seed", "1"])
    assert again.exit_code == 0, again.output  # an earlier export is replaced
    assert AutoConfig.from_pretrained(tmp_path / "ok").seed == 1
    artifact = tmp_path / "artifact"
    assert runner.invoke(cli, ["export", spec, "-o", str(artifact)]).exit_code == 0
    (artifact / "weights.safetensors").write_bytes(b"changed")
    changed = runner.invoke(cli, ["export", str(artifact), "--format", "hf", "-o", str(tmp_path / "from-changed")])
    assert changed.exit_code == 1 and "weights.safetensors" in changed.output, changed.output


def test_a_plugin_model_loads_only_with_its_plugin_passed(tmp_path):
    plugin = str(ROOT / "examples" / "plugins" / "log_cosh.py")
    spec = tiny_spec(tmp_path, "lmm")
    export_hf(spec, tmp_path / "hf", overrides=["update.loss=log_cosh"], plugins=[plugin])
    with pytest.raises(ValueError, match=r"config.json: .*log_cosh.py"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", plugins=[plugin])
    assert model.config.plugin_records[0]["name"] == "log_cosh.py"


def test_trust_remote_code_loads_without_importing_titans_compose_hf_first(tiny_exports, tmp_path):
    """A fresh interpreter that never imports titans_compose.hf loads the export with trust_remote_code=True: the
    directory's three-line module imports the installed package."""
    source, directory = tiny_exports["mal"]
    toks = tokens(1, 9)
    torch.save(toks, tmp_path / "tokens.pt")
    code = (
        "import sys, torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})  # this process's: the same summation order, equal logits\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "assert 'titans_compose.hf' not in sys.modules\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(directory)!r}, trust_remote_code=True).eval()\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(directory)!r}, trust_remote_code=True)\n"
        f"toks = torch.load({str(tmp_path / 'tokens.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(toks).logits, {str(tmp_path / 'logits.pt')!r})\n"
        "print(type(model).__name__, type(tokenizer).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["TitansComposeForCausalLM", "ByteTokenizer"]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), source(toks).logits)


def test_a_few_trainer_steps_lower_the_loss(tiny_exports, tmp_path):
    """transformers' Trainer (AdamW, its own loop and loss weighting) trains the model: 12 steps on one repeated
    batch of text lower the next-token loss."""
    from transformers import Trainer, TrainingArguments

    _, directory = tiny_exports["mag"]
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    rows = [tokenizer("The memory is trained at test time, token by token. " * 2).input_ids[:32]] * 4
    data = [{"input_ids": torch.tensor(r), "labels": torch.tensor(r)} for r in rows]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    batch = torch.tensor(rows)
    with torch.no_grad():
        before = float(model(batch, labels=batch).loss)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    with torch.no_grad():
        after = float(model.eval()(batch, labels=batch).loss)
    # the first logged loss is this batch's loss before any step, up to how the release counts the batch's tokens
    # for `num_items_in_batch` (5.0 counts all 128 labels, later releases the 124 that are predicted)
    assert len(logged) == 12 and math.isclose(logged[0], before, rel_tol=0.04)
    assert after < 0.7 * before and logged[-1] < 0.7 * logged[0], (before, logged, after)


def _greedy_text(model, prompt: str, new: int, stops: list[str]) -> str:
    """The model's own greedy continuation of ``prompt`` (TitansLM.generate) as lm-eval reads a generation: decoded
    without the tokenizer's special token (NUL, which neither generate stops at), cut at the first stop string."""
    ids = encode(prompt)[None]
    continuation = model.generate(ids, new)[0, ids.shape[1] :]
    text = decode(continuation[continuation != 0])
    cut = min([text.index(s) for s in stops if s in text], default=len(text))
    return text[:cut]


def test_lm_eval_runs_the_local_tasks_and_reports_what_a_direct_computation_gives(tiny_exports, tmp_path):
    """`python -m titans_compose.hf.lm_eval_cli --model titans_compose` runs a local log-likelihood task and a local
    greedy-generation task (tests/hf_task, batches of 2: lm-eval pads them). Its perplexity and accuracy equal those
    of the continuations' log-likelihoods computed here with the source model (one row at a time, float32: relative
    1e-4 covers another batch shape's summation order inside exp of a sum of ~30 terms); its generations equal the
    model's own greedy ones. Two of the four generation targets are the model's own continuations, so the exact
    match is 0.5, not a trivial 0."""
    pytest.importorskip("lm_eval", reason='the hf extra is not installed (pip install -e ".[hf]")')
    source, directory = tiny_exports["mac"]
    task = tmp_path / "tests" / "hf_task"
    task.mkdir(parents=True)
    for name in ("titans_tiny_ll.yaml", "titans_tiny_gen.yaml", "tiny_ll.jsonl"):
        (task / name).write_bytes((ROOT / "tests" / "hf_task" / name).read_bytes())
    stops = ["\n"]  # the task's `until` (lm-eval adds the NUL end-of-text string, which its decoding drops)
    docs = [json.loads(line) for line in (ROOT / "tests" / "hf_task" / "tiny_gen.jsonl").read_text().splitlines()]
    with torch.no_grad():
        for doc in docs[::2]:
            doc["target"] = _greedy_text(source, doc["prompt"], 6, stops)
    (task / "tiny_gen.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))

    command = [sys.executable, "-m", "titans_compose.hf.lm_eval_cli", "--model", "titans_compose"]
    command += ["--model_args", f"pretrained={directory}", "--device", "cpu", "--batch_size", "2"]
    command += ["--tasks", "titans_tiny_ll,titans_tiny_gen", "--include_path", str(task)]
    command += ["--output_path", str(tmp_path / "out"), "--log_samples"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]

    lls, greedy = [], []
    with torch.no_grad():
        for line in (task / "tiny_ll.jsonl").read_text().splitlines():
            doc = json.loads(line)
            context, continuation = encode(doc["context"]), encode(doc["continuation"])
            seq = torch.cat([context, continuation])[None]
            logprobs = source(seq[:, :-1]).logits.log_softmax(-1)[0, context.numel() - 1 :]
            lls.append(float(logprobs.gather(-1, continuation[:, None]).sum()))
            greedy.append(bool((logprobs.argmax(-1) == continuation).all()))
    ll = results["titans_tiny_ll"]
    assert math.isclose(ll["perplexity,none"], math.exp(-sum(lls) / len(lls)), rel_tol=1e-4)
    assert ll["acc,none"] == sum(greedy) / len(greedy)

    with torch.no_grad():
        want = {doc["prompt"]: _greedy_text(source, doc["prompt"], 6, stops) for doc in docs}
    (samples_file,) = (tmp_path / "out").rglob("samples_titans_tiny_gen_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert {s["doc"]["prompt"]: s["filtered_resps"][0] for s in samples} == want
    assert results["titans_tiny_gen"]["exact_match,none"] == 0.5


def test_without_the_extra_the_errors_say_how_to_install_it(tmp_path):
    """With transformers and lm-eval absent (shadowed by modules that raise ModuleNotFoundError), the export command
    and the lm-eval entry point fail with the install command, and the test module skips with it as its reason."""
    for name in ("transformers", "lm_eval"):
        (tmp_path / f"{name}.py").write_text(f"raise ModuleNotFoundError('no module named {name} (shadowed)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    spec = tiny_spec(tmp_path, "lmm")
    runs = {
        "export": [sys.executable, "-m", "titans_compose.cli.main", "export", spec, "--format", "hf", "-o", "out"],
        "lm-eval": [sys.executable, "-m", "titans_compose.hf.lm_eval_cli", "--tasks", "x"],
        "tests": [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests/hf/test_hf.py"),
        ],
    }
    for what, command in runs.items():
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        output = done.stdout + done.stderr
        assert 'pip install -e ".[hf]"' in output, (what, output[-2000:])
        if what == "tests":  # the whole module skipped: pytest's exit status 5, nothing ran
            assert done.returncode == 5 and "1 skipped" in output, output[-2000:]
        else:
            assert done.returncode == 1, (what, output[-2000:])
    assert not (tmp_path / "out").exists()


def test_a_tokenizers_file_is_shipped_and_named_and_a_small_vocabulary_needs_one(tmp_path, runner):
    """--tokenizer FILE ships a tokenizers JSON file as tokenizer.json (AutoTokenizer gives its ids), and the
    configuration names it with its sha256; a model with fewer than 256 tokens cannot take the byte tokeniser."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["the memory learns at test time", "attention is short-term memory", "titans memorize"] * 5
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    backend.save(str(tmp_path / "bpe.json"))
    spec = tiny_spec(tmp_path, "lmm")
    args = ["export", spec, "--format", "hf", "--set", "model.vocab_size=64", "-o", str(tmp_path / "hf")]
    result = runner.invoke(cli, [*args, "--tokenizer", str(tmp_path / "bpe.json")])
    assert result.exit_code == 0, result.output
    assert "tokenizer.json" in result.output and "tokenizer: tokenizers" in result.output
    config = AutoConfig.from_pretrained(tmp_path / "hf")
    stored = (tmp_path / "hf" / "tokenizer.json").read_bytes()
    assert config.tokenizer == {"kind": "tokenizers", "file": "tokenizer.json", "sha256": sha256(stored)}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the titans memory learns"
    assert tokenizer(text).input_ids == backend.encode(text).ids
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=3, do_sample=False).shape == (1, 7)

    refused = runner.invoke(cli, [*args[:-1], str(tmp_path / "bytes")])
    assert refused.exit_code == 1 and "fewer than the 256 bytes" in refused.output
    assert not (tmp_path / "bytes").exists()
    wrong = runner.invoke(cli, ["export", spec, "-o", str(tmp_path / "a"), "--tokenizer", str(tmp_path / "bpe.json")])
    assert wrong.exit_code == 2 and "--format hf export only" in wrong.output
