"""Fine-tuning with transformers.Trainer (hf_attn/finetune), the shipped metrics and the stdlib task."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from finetune_helpers import expected_code_files, pretrained_checkpoint, single_thread, training_args  # noqa: F401
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainerCallback,
)

from hf_attn import HfAttnForCausalLM, HfAttnForSequenceClassification
from hf_attn.finetune import (
    DEFAULT_PACKAGES,
    DataArguments,
    ModelArguments,
    build_stdlib_dataset,
    load_raw_datasets,
    run_finetune,
)
from hf_attn.finetune.checkpoints import (
    checkpoint_problems,
    last_complete_checkpoint,
    resolve_resume_checkpoint,
)
from hf_attn.finetune.data import stdlib_dir
from hf_attn.finetune.run import prepare_causal_lm, prepare_classification
from hf_attn.metrics import load_metric

REPO_ROOT = Path(__file__).resolve().parent.parent
# Small slices keep every Trainer run at a few seconds on a shared CPU.
DATA = dict(max_seq_length=32, max_train_samples=256, max_eval_samples=48)


# ---- metrics -------------------------------------------------------------------------------------


def test_accuracy_metric():
    accuracy = load_metric("accuracy")
    assert accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}
    assert accuracy.compute(predictions=[0, 1], references=[0, 0], normalize=False) == {"accuracy": 1.0}
    weighted = accuracy.compute(predictions=[0, 1], references=[0, 0], sample_weight=[3, 1])
    assert weighted == {"accuracy": 0.75}
    with pytest.raises(ValueError, match="sample_weight"):
        accuracy.compute(predictions=[0, 1], references=[0, 0], sample_weight=[1.0])


def test_f1_metric_by_hand():
    f1 = load_metric("f1")
    # binary, positive class 1: TP=1, FP=1, FN=0 -> P=1/2, R=1 -> F1=2/3
    assert f1.compute(predictions=[1, 1, 0, 0], references=[1, 0, 0, 0])["f1"] == pytest.approx(2 / 3)
    # macro over 3 classes: per class F1 = [1, 2/3, 0] (class 2 never predicted correctly)
    preds, refs = [0, 1, 1, 1], [0, 1, 1, 2]
    assert f1.compute(predictions=preds, references=refs, average="macro")["f1"] == pytest.approx((1 + 0.8 + 0) / 3)
    assert f1.compute(predictions=preds, references=refs, average=None)["f1"] == pytest.approx([1.0, 0.8, 0.0])
    assert f1.compute(predictions=preds, references=refs, average="micro")["f1"] == pytest.approx(0.75)
    # a label absent from both predictions and references still counts in macro when listed
    assert f1.compute(predictions=[0, 1], references=[0, 1], average="macro", labels=[0, 1, 2])["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="average"):
        f1.compute(predictions=[0, 1], references=[0, 1], average="mean")
    with pytest.raises(ValueError, match="binary"):
        f1.compute(predictions=[0, 1, 2], references=[0, 1, 2])


def test_metrics_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    preds, refs = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    assert load_metric("accuracy").compute(predictions=preds, references=refs)["accuracy"] == pytest.approx(
        metrics.accuracy_score(refs, preds)
    )
    f1 = load_metric("f1")
    for average in ("macro", "micro", "weighted"):
        ours = f1.compute(predictions=preds, references=refs, average=average)["f1"]
        assert ours == pytest.approx(metrics.f1_score(refs, preds, average=average))


# ---- the built-in stdlib task --------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_task():
    return build_stdlib_dataset()


def test_stdlib_task_labels_are_file_provenance(stdlib_task):
    names = stdlib_task["train"].features["label"].names
    assert names == list(DEFAULT_PACKAGES)
    for split in stdlib_task.values():
        for row in split:
            assert row["path"].split("/")[0] == names[row["label"]]
            assert not any(part.startswith("test") for part in row["path"].split("/"))
            # the text is the function's source, verbatim up to dedent and truncation
            source = (stdlib_dir() / row["path"]).read_text(encoding="utf-8")
            first = row["text"].splitlines()[0].strip()
            assert first.startswith(("def ", "async def ")) and first in source


def test_stdlib_task_split_by_file_without_duplicates(stdlib_task):
    paths = {name: set(split["path"]) for name, split in stdlib_task.items()}
    assert not (paths["train"] & paths["validation"] or paths["train"] & paths["test"]
                or paths["validation"] & paths["test"])
    texts = [t for split in stdlib_task.values() for t in split["text"]]
    assert len(texts) == len(set(texts))
    sizes = {name: len(split) for name, split in stdlib_task.items()}
    assert sizes["train"] > 4 * sizes["test"] > 0 and sizes["validation"] > 0
    for split in stdlib_task.values():  # every class in every split
        assert set(Counter(split["label"])) == set(range(len(DEFAULT_PACKAGES)))


def test_stdlib_task_is_deterministic_and_mixed(stdlib_task):
    again = build_stdlib_dataset()
    for name in stdlib_task:
        assert list(again[name]["text"]) == list(stdlib_task[name]["text"])
    first = list(stdlib_task["train"]["label"])[:40]  # --max_train_samples takes a prefix
    assert len(set(first)) == len(DEFAULT_PACKAGES)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"packages": ["asyncio"]}, "packages"),
        ({"packages": ["asyncio", "no_such_package"]}, "packages"),
        ({"validation_fraction": 0.0}, "validation_fraction"),
        ({"validation_fraction": 0.5, "test_fraction": 0.5}, "validation_fraction \\+ test_fraction"),
    ],
)
def test_stdlib_task_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_stdlib_dataset(**kwargs)


def test_local_files_load_through_the_same_path(tmp_path):
    rows = [{"text": f"def f{i}(): return {i}", "label": "even" if i % 2 == 0 else "odd"} for i in range(20)]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows))
    raw = load_raw_datasets(train_file=str(train), validation_split_percentage=25)
    assert len(raw["train"]) == 15 and len(raw["validation"]) == 5
    with pytest.raises(ValueError, match="train_file"):
        load_raw_datasets(train_file=str(tmp_path / "train.xml"))
    with pytest.raises(ValueError, match="dataset_name, train_file"):
        load_raw_datasets("imdb", train_file=str(train))


# ---- argument validation -------------------------------------------------------------------------


def test_arguments_reject_bad_values(tmp_path):
    with pytest.raises(ValueError, match="task.*causal_lm"):
        ModelArguments(model_name_or_path="x", task="translation")
    with pytest.raises(ValueError, match="max_seq_length"):
        DataArguments(max_seq_length=1)
    with pytest.raises(ValueError, match="early_stopping_patience.*load_best_model_at_end"):
        run_finetune(
            ModelArguments(model_name_or_path=str(pretrained_checkpoint()), early_stopping_patience=2),
            DataArguments(**DATA),
            training_args(tmp_path, do_train=True),
        )


# ---- fine-tuning ---------------------------------------------------------------------------------


def test_causal_lm_finetune_lowers_eval_loss_and_reloads(tmp_path):
    model_args = ModelArguments(model_name_or_path=str(pretrained_checkpoint()), task="causal_lm")
    data_args = DataArguments(max_seq_length=32, max_train_samples=512, max_eval_samples=48)
    before = run_finetune(model_args, data_args, training_args(tmp_path / "before", do_eval=True))
    after = run_finetune(
        model_args, data_args,
        training_args(tmp_path / "out", do_train=True, do_eval=True, max_steps=40, per_device_train_batch_size=16,
                      learning_rate=5e-3),
    )
    assert after["eval_loss"] < before["eval_loss"] - 0.05, (before["eval_loss"], after["eval_loss"])
    # the perplexity metric module agrees with exp(mean loss): every packed block is fully scored
    assert after["eval_perplexity"] == pytest.approx(math.exp(after["eval_loss"]), rel=1e-4)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(model, HfAttnForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    raw = load_raw_datasets()
    raw = {"validation": raw["validation"].select(range(DATA["max_eval_samples"]))}
    blocks = torch.tensor(prepare_causal_lm(raw, tokenizer, data_args)["validation"]["input_ids"])
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss.item()
    assert loss == pytest.approx(after["eval_loss"], rel=1e-4)


def test_sequence_classification_finetune_lowers_eval_loss_and_reloads(tmp_path):
    # Two packages (binary F1 path): a 32-wide model separates them within 50 steps (800 examples).
    packages = ["email", "asyncio"]
    model_args = ModelArguments(model_name_or_path=str(pretrained_checkpoint()), task="sequence_classification")
    data_args = DataArguments(max_seq_length=32, max_eval_samples=96, stdlib_packages=",".join(packages))
    before = run_finetune(model_args, data_args, training_args(tmp_path / "before", do_eval=True))
    after = run_finetune(
        model_args, data_args,
        training_args(tmp_path / "out", do_train=True, do_eval=True, do_predict=True, max_steps=50,
                      per_device_train_batch_size=16, learning_rate=5e-3),
    )
    assert after["eval_loss"] < before["eval_loss"] - 0.05, (before["eval_loss"], after["eval_loss"])
    assert 0.0 <= after["test_accuracy"] <= 1.0 and 0.0 <= after["test_f1"] <= 1.0

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert isinstance(model, HfAttnForSequenceClassification)
    assert list(model.config.id2label.values()) == packages
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    raw = load_raw_datasets(stdlib_packages=packages)
    raw = {"validation": raw["validation"].select(range(data_args.max_eval_samples))}
    encoded = prepare_classification(raw, tokenizer, data_args, packages)["validation"]
    batch = DataCollatorWithPadding(tokenizer)([encoded[i] for i in range(len(encoded))])
    with torch.no_grad():
        out = model(**batch)
    assert out.loss.item() == pytest.approx(after["eval_loss"], rel=1e-4)
    predictions = out.logits.argmax(-1)
    assert (predictions == batch["labels"]).float().mean().item() == pytest.approx(after["eval_accuracy"])
    f1 = load_metric("f1").compute(predictions=predictions, references=batch["labels"])["f1"]
    assert f1 == pytest.approx(after["eval_f1"])


class _Interrupt(Exception):
    pass


class _InterruptAfter(TrainerCallback):
    """Crash the run at the end of step ``step`` (as a killed job would), after earlier checkpoints."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Interrupt(f"interrupted at step {self.step}")


def test_interrupted_run_resumes_from_checkpoint_with_code(tmp_path):
    model_args = ModelArguments(model_name_or_path=str(pretrained_checkpoint()))
    data_args = DataArguments(**DATA)
    common = dict(do_train=True, max_steps=6, save_strategy="steps", save_steps=3)
    run_finetune(model_args, data_args, training_args(tmp_path / "ref", **common))

    with pytest.raises(_Interrupt):
        run_finetune(model_args, data_args, training_args(tmp_path / "run", **common), callbacks=[_InterruptAfter(4)])
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-3"]
    # the intermediate checkpoint carries the modeling code and an auto_map, and a model card
    assert expected_code_files() <= {p.name for p in checkpoint.glob("*.py")}
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForSequenceClassification"] == "modeling_hf_attn.HfAttnForSequenceClassification"
    assert (checkpoint / "README.md").is_file() and (checkpoint / "model.safetensors").is_file()

    run_finetune(
        model_args, data_args, training_args(tmp_path / "run", resume_from_checkpoint=str(checkpoint), **common)
    )
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    ref_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ref")
    run_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run")
    for (name, a), (_, b) in zip(ref_model.state_dict().items(), run_model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=f"{name} differs between resumed and uninterrupted runs")


class _RecordSteps(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_resume_last_skips_a_checkpoint_left_incomplete_by_a_killed_save(tmp_path, caplog):
    model_args = ModelArguments(model_name_or_path=str(pretrained_checkpoint()))
    data_args = DataArguments(**DATA)
    common = dict(do_train=True, max_steps=4, save_strategy="steps", save_steps=2)
    run = tmp_path / "run"
    run_finetune(model_args, data_args, training_args(run, **common))
    uninterrupted = AutoModelForSequenceClassification.from_pretrained(run).state_dict()
    # Trainer writes trainer_state.json last: a job killed while saving checkpoint-4 leaves it out
    (run / "checkpoint-4" / "trainer_state.json").unlink()

    steps = _RecordSteps()
    with caplog.at_level(logging.WARNING, logger="hf_attn.finetune"):
        run_finetune(
            model_args, data_args, training_args(run, resume_from_checkpoint="last", **common), callbacks=[steps]
        )
    assert steps.steps == [3, 4]  # resumed from checkpoint-2, the last complete one
    assert "checkpoint-4" in caplog.text and "no trainer_state.json" in caplog.text
    resumed = AutoModelForSequenceClassification.from_pretrained(run).state_dict()
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, msg=f"{name} differs between resumed and uninterrupted runs")


def _complete_checkpoint(folder: Path) -> Path:
    """The files Trainer writes into checkpoint-N (contents stand-ins, except the checked formats)."""
    folder.mkdir(parents=True)
    save_file({"weight": torch.zeros(4)}, str(folder / "model.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (folder / name).write_bytes(b"state")
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda f: (f / "trainer_state.json").unlink(), "no trainer_state.json"),
        (lambda f: _truncate(f / "trainer_state.json"), "trainer_state.json is not valid JSON"),
        (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
        (lambda f: _truncate(f / "model.safetensors"), "model.safetensors is incomplete or corrupt"),
        (lambda f: (f / "optimizer.pt").unlink(), "no optimizer state"),
        (lambda f: (f / "scheduler.pt").unlink(), "no scheduler.pt"),
    ],
    ids=["no-state", "truncated-state", "no-weights", "truncated-weights", "no-optimizer", "no-scheduler"],
)
def test_last_complete_checkpoint_skips_incomplete_ones(tmp_path, caplog, damage, problem):
    _complete_checkpoint(tmp_path / "checkpoint-2")
    newest = _complete_checkpoint(tmp_path / "checkpoint-10")  # 10 > 2: numeric order, not text order
    assert last_complete_checkpoint(tmp_path) == newest
    damage(newest)
    assert any(problem in p for p in checkpoint_problems(newest))
    with caplog.at_level(logging.WARNING, logger="hf_attn.finetune"):
        assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert f"skipping incomplete checkpoint {newest}" in caplog.text and problem in caplog.text
    with pytest.raises(ValueError, match=f"checkpoint-10 cannot be resumed from: .*{problem}"):
        resolve_resume_checkpoint(str(newest), tmp_path)


def test_resume_last_without_a_complete_checkpoint_raises(tmp_path):
    (_complete_checkpoint(tmp_path / "checkpoint-3") / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match="no complete checkpoint-N folder"):
        resolve_resume_checkpoint("last", tmp_path)
    # save_only_model runs never write optimizer state; they resume without it
    assert resolve_resume_checkpoint("last", tmp_path, require_optimizer=False) == str(tmp_path / "checkpoint-3")
    assert resolve_resume_checkpoint(None, tmp_path) is None


def test_early_stopping_stops_training(tmp_path):
    model_args = ModelArguments(
        model_name_or_path=str(pretrained_checkpoint()),
        early_stopping_patience=1,
        early_stopping_threshold=1e9,  # no evaluation can improve by this much: stop at the 2nd one
    )
    args = training_args(
        tmp_path, do_train=True, do_eval=True, max_steps=40, eval_strategy="steps", eval_steps=2,
        save_strategy="steps", save_steps=2, load_best_model_at_end=True,
    )
    run_finetune(model_args, DataArguments(**DATA), args)
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 4


# Trainer passes num_items_in_batch to models whose forward takes **kwargs and then multiplies the loss by
# the number of processes; a per-example-mean loss must opt out with accepts_loss_kwargs = False.


def test_two_process_run_matches_one_process(tmp_path):
    """scripts/finetune.py under torchrun with 2 CPU processes: trains, saves, and reports the same eval
    loss as a 1-process evaluation of the saved model (the loss is not scaled by the process count).

    48 eval rows = 2 processes x 24: with a global eval batch larger than the data, accelerate pads
    the last process's batch with repeated rows, and Trainer's per-batch mean loss then weights them."""
    flags = ["--max_seq_length", "64", "--max_train_samples", "64", "--max_eval_samples", "48",
             "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "24",
             "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0"]
    out = tmp_path / "ddp"
    with socket.socket() as s:  # a free port for the rendezvous (other test runs may share the machine)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(REPO_ROOT / "scripts" / "finetune.py"), "--model_name_or_path", str(pretrained_checkpoint()),
         "--output_dir", str(out), "--do_train", "--do_eval", "--max_steps", "3", *flags],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((out / "eval_results.json").read_text())
    one = run_finetune(
        ModelArguments(model_name_or_path=str(out)),
        DataArguments(max_seq_length=64, max_eval_samples=48),
        training_args(tmp_path / "single", do_eval=True),
    )
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    assert two["eval_accuracy"] == pytest.approx(one["eval_accuracy"])
