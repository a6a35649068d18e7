"""Tests of the training stack: configs, metric, loop, multi-process equivalence, checkpoints, faults.

Every run here is a tiny model (a few thousand parameters) on a few stdlib modules, so a run takes
seconds. One in-process reference run (``reference``) is shared: the 2-process run, the killed and
resumed run and the write-error run must all end on its exact numbers.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import accelerate.accelerator
import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_attn import ATTENTION_MODES, HfAttnForCausalLM
from hf_attn.metrics import available_metrics, load_metric
from hf_attn.training import CheckpointError, NonFiniteLossError, load_config, train
from hf_attn.training.checkpoint import (
    COMPLETE_MARKER,
    checkpoint_name,
    latest_checkpoint,
    list_complete_checkpoints,
    read_checkpoint_metadata,
)
from hf_attn.training.config import apply_overrides, config_from_dict
from hf_attn.training.data import stdlib_root
from hf_attn.training.generation import generate_text
from hf_attn.training.trainer import WarmupCosine

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"
_MODULES = [
    "bisect.py",
    "colorsys.py",
    "fnmatch.py",
    "glob.py",
    "heapq.py",
    "keyword.py",
    "shlex.py",
    "textwrap.py",
]
MAX_STEPS = 12


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A corpus folder of real stdlib modules and a datasets cache shared by every run of the session."""
    root = tmp_path_factory.mktemp("training")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in _MODULES:
        (corpus / name).write_text((stdlib_root() / name).read_text(encoding="utf-8"), encoding="utf-8")
    return {"root": root, "corpus": corpus, "cache": root / "datasets_cache"}


def tiny_overrides(workspace: dict[str, Path], output_dir: Path, **extra: Any) -> dict[str, Any]:
    """Dotted config keys of the tiny run; ``extra`` uses ``section__key`` names."""
    keys = {
        "model.attention_mode": "eager",
        "model.hidden_size": 32,
        "model.num_hidden_layers": 2,
        "model.num_attention_heads": 2,
        "model.max_position_embeddings": 32,
        "model.sliding_window": 8,
        "model.lowrank_dim": 8,
        "model.lowrank_chunk_size": 8,
        "data.dataset": "files",
        "data.data_files": [str(workspace["corpus"])],
        "data.validation_fraction": 0.25,
        "data.block_size": 32,
        "data.cache_dir": str(workspace["cache"]),
        "tokenizer.vocab_size": 320,
        "training.output_dir": str(output_dir),
        "training.max_steps": MAX_STEPS,
        "training.per_device_batch_size": 4,
        "training.learning_rate": 5e-3,
        "training.warmup_steps": 2,
        "training.log_every": 1,
        "training.eval_every": None,
        "training.eval_batch_size": 8,
        "training.checkpoint_every": 3,
        "training.keep_checkpoints": 10,
        "training.report_to": "none",
    }
    keys.update({k.replace("__", "."): v for k, v in extra.items()})
    return keys


def tiny_config(workspace: dict[str, Path], output_dir: Path, **extra: Any):
    return config_from_dict(apply_overrides({}, tiny_overrides(workspace, output_dir, **extra)))


def cli_args(overrides: dict[str, Any]) -> list[str]:
    # JSON is valid YAML, so every value round-trips through the CLI parser.
    return [arg for key, value in overrides.items() for arg in (f"--{key}", json.dumps(value))]


def subprocess_env(workspace: dict[str, Path]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["HF_DATASETS_CACHE"] = str(workspace["cache"])
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1"
    )
    env.pop("WORLD_SIZE", None)
    return env


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0.0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; later lines win (a resumed run re-logs replayed steps)."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the last line of a file that is being appended to
            continue
        if "train/loss" in row:
            losses[row["step"]] = row["train/loss"]
    return losses


@pytest.fixture(autouse=True)
def _isolated_cache_and_one_thread(workspace, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", workspace["cache"])
    # These models are tiny: on a shared CPU, a second intra-op thread only adds contention (100x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference(workspace):
    """An uninterrupted 1-process run: 12 steps, checkpoints every 3, TensorBoard on."""
    config = tiny_config(workspace, workspace["root"] / "reference", training__report_to="tensorboard")
    return train(config)


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"training.max_stepz": 3}, ["training.max_stepz is unknown", "max_steps"]),
        ({"training.max_steps": 0}, ["training.max_steps=0", "integer >= 1"]),
        (
            {"training.on_nonfinite_loss": "ignore"},
            ["training.on_nonfinite_loss='ignore'", "['stop', 'skip']"],
        ),
        ({"training.mixed_precision": "fp8"}, ["training.mixed_precision='fp8'", "'bf16'"]),
        (
            {"model.attention_mode": "flash"},
            ["attention_mode='flash'", "'eager', 'local', 'lowrank', 'rope'"],
        ),
        ({"model.attention_mod": "local"}, ["model.attention_mod is unknown", "attention_mode"]),
        ({"model.vocab_size": 100}, ["model.vocab_size", "tokenizer.vocab_size"]),
        ({"model.is_causal": False}, ["model.is_causal", "is_causal=True"]),
        ({"data.block_size": 64}, ["data.block_size=64", "model.max_position_embeddings=32"]),
        ({"data.validation_fraction": 0.9}, ["data.validation_fraction=0.9", "(0.0, 0.5]"]),
        ({"tokenizer.vocab_size": 100}, ["tokenizer.vocab_size=100", "integer >= 259"]),
        ({"trainer.seed": 1}, ["section 'trainer' is unknown", "'training'"]),
    ],
)
def test_bad_config_is_rejected_naming_the_key_and_allowed_values(workspace, tmp_path, overrides, fragments):
    raw = apply_overrides({}, {**tiny_overrides(workspace, tmp_path / "run"), **overrides})
    with pytest.raises(ValueError) as info:
        config_from_dict(raw)
    for fragment in fragments:
        assert fragment in str(info.value)


def _train_script_main():
    # scripts/ is not a package: load the file as a module to call its main() in-process.
    spec = importlib.util.spec_from_file_location("train_script", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_rejects_bad_keys_before_any_work(tmp_path, capsys):
    out = tmp_path / "never_created"
    with pytest.raises(SystemExit) as info:
        _train_script_main()(
            [
                "--config",
                str(REPO / "configs" / "small_eager.yaml"),
                "--training.output_dir",
                str(out),
                "--training.max_stepz",
                "3",
            ]
        )
    assert info.value.code == 2
    assert "training.max_stepz is unknown" in capsys.readouterr().err
    assert not out.exists()


def test_cli_overrides_any_key_of_a_yaml_file():
    config = load_config(
        REPO / "configs" / "small_eager.yaml",
        [
            "--model.attention_mode",
            "local",
            "--training.max_steps=10",
            "--data.validation_split",
            "null",
            "--training.resume",
        ],
    )
    assert config.model["attention_mode"] == "local"
    assert config.training.max_steps == 10 and config.training.resume is True
    assert config.data.validation_split is None
    assert config.model["hidden_size"] == 128  # untouched keys keep the file's value


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path):
    config = load_config(path)
    assert config.model["attention_mode"] in path.stem  # files are named <size>_<mode>.yaml


def test_every_attention_mode_has_a_small_config():
    assert {p.stem for p in (REPO / "configs").glob("small_*.yaml")} == {
        f"small_{m}" for m in ATTENTION_MODES
    }


# ---------------------------------------------------------------------------------------------- metric


def test_perplexity_metric_matches_torch_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 6, 11), torch.randint(0, 11, (3, 6))
    labels[1, 2] = -100
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    from_logits = load_metric("perplexity", config_name="logits").compute(
        logits=logits.tolist(), labels=labels.tolist()
    )
    assert from_logits["num_tokens"] == 14
    assert from_logits["perplexity"] == pytest.approx(math.exp(expected.item()), rel=1e-5)

    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none"
    )
    metric = load_metric("perplexity")
    metric.add_batch(losses=nll[:2].tolist())
    metric.add_batch(losses=nll[2:].tolist())
    assert metric.compute()["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-6)


def test_perplexity_metric_and_loader_reject_bad_input():
    with pytest.raises(ValueError, match="no token is scored"):
        load_metric("perplexity").compute(losses=[[]])
    with pytest.raises(ValueError, match="finite non-negative"):
        load_metric("perplexity").compute(losses=[[1.0, float("nan")]])
    with pytest.raises(ValueError, match=r"name='bleu' is invalid: allowed values are \[.*'perplexity'"):
        load_metric("bleu")
    assert "perplexity" in available_metrics()


def test_warmup_then_cosine_schedule():
    schedule = WarmupCosine(warmup=4, total=14, min_ratio=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == pytest.approx(1.0)
    assert schedule(9) == pytest.approx(0.55)  # half way through the decay: (1 + 0.1) / 2
    assert schedule(14) == pytest.approx(0.1) and schedule(100) == pytest.approx(0.1)
    assert all(schedule(s) >= schedule(s + 1) for s in range(4, 20))


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_loss_falls_for_every_attention_mode(workspace, tmp_path, mode):
    config = tiny_config(
        workspace,
        tmp_path / mode,
        model__attention_mode=mode,
        training__max_steps=30,
        training__checkpoint_every=None,
    )
    result = train(config)
    losses = [result.losses[s] for s in range(1, 31)]
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # Untrained loss is ~ln(320) = 5.77; 30 steps must take a clear bite out of it.
    assert last < first - 0.8, (mode, first, last)
    assert result.final_eval["perplexity"] < 320 / 2  # at least halves a uniform guess over the vocabulary


def test_reference_run_writes_a_loadable_final_folder(reference, workspace):
    final = reference.final_dir
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "train_results.json",
        "modeling_hf_attn.py",
        "configuration_hf_attn.py",
    ):
        assert (final / name).is_file(), name
    assert "AutoModelForCausalLM" in json.loads((final / "config.json").read_text())["auto_map"]
    assert list(
        (reference.output_dir / "tensorboard").rglob("events.out.tfevents.*")
    )  # TensorBoard tracker wrote
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert isinstance(model, HfAttnForCausalLM)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    # The reloaded weights reproduce the validation perplexity measured in training.
    config = tiny_config(workspace, reference.output_dir)
    from hf_attn.training.data import load_raw_datasets, tokenize_and_pack

    blocks = tokenize_and_pack(load_raw_datasets(config.data), tokenizer, config.data.block_size)[
        "validation"
    ]
    ids = blocks[:]["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:])
    assert math.exp(nll.item()) == pytest.approx(reference.final_eval["perplexity"], rel=1e-4)
    summary = json.loads((final / "train_results.json").read_text())
    assert summary["validation_perplexity"] == pytest.approx(reference.final_eval["perplexity"])
    assert summary["steps"] == MAX_STEPS and summary["tokens_seen"] == MAX_STEPS * 4 * 32

    text = generate_text(model, tokenizer, "def ", max_new_tokens=12, seed=0)
    assert text.startswith("def ") and len(tokenizer(text)["input_ids"]) > len(tokenizer("def ")["input_ids"])


def test_gradient_accumulation_matches_a_bigger_batch(reference, workspace, tmp_path):
    config = tiny_config(
        workspace,
        tmp_path / "accum",
        training__per_device_batch_size=2,
        training__gradient_accumulation_steps=2,
        training__checkpoint_every=None,
    )
    result = train(config)
    assert result.losses.keys() == reference.losses.keys()
    for step, loss in reference.losses.items():
        assert result.losses[step] == pytest.approx(loss, rel=1e-5), step
    assert_same_weights(final_weights(tmp_path / "accum"), final_weights(reference.output_dir), atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_global_batch(reference, workspace, tmp_path):
    run_dir = tmp_path / "ddp"
    overrides = tiny_overrides(workspace, run_dir, training__per_device_batch_size=2)  # 2 x 2 = 4 = reference
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(TRAIN_SCRIPT),
        *cli_args(overrides),
    ]
    proc = subprocess.run(command, env=subprocess_env(workspace), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "final" / "train_results.json").read_text())
    assert summary["num_processes"] == 2  # really one 2-process group, not two separate runs
    losses = read_losses(run_dir)
    assert losses.keys() == reference.losses.keys()
    for step, loss in reference.losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    assert_same_weights(final_weights(run_dir), final_weights(reference.output_dir), atol=1e-5)
    assert summary["validation_perplexity"] == pytest.approx(reference.final_eval["perplexity"], rel=1e-4)


# ---------------------------------------------------------------------------------------------- checkpoints


def _slow_training_command(overrides: dict[str, Any]) -> list[str]:
    # Slows each optimizer step so that the test can SIGKILL the run at a chosen step.
    code = (
        "import runpy, sys, time, torch\n"
        "step = torch.optim.AdamW.step\n"
        "def slow(self, *a, **k):\n"
        "    time.sleep(0.2)\n"
        "    return step(self, *a, **k)\n"
        "torch.optim.AdamW.step = slow\n"
        f"sys.argv = [{str(TRAIN_SCRIPT)!r}, *sys.argv[1:]]\n"
        f"runpy.run_path({str(TRAIN_SCRIPT)!r}, run_name='__main__')\n"
    )
    return [sys.executable, "-c", code, *cli_args(overrides)]


def test_sigkill_at_a_random_step_then_resume_ends_with_the_same_weights(reference, workspace, tmp_path):
    seed = random.randrange(10**6)
    # Step 3's checkpoint is saved before step 4 is logged, so a kill at >= 4 always follows a checkpoint.
    kill_after = random.Random(seed).randint(4, MAX_STEPS - 1)
    run_dir = tmp_path / "killed"
    overrides = tiny_overrides(workspace, run_dir)
    env = subprocess_env(workspace)
    proc = subprocess.Popen(
        _slow_training_command(overrides), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and max(read_losses(run_dir), default=0) >= kill_after:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (
            f"run ended before step {kill_after} (seed {seed}): {proc.stdout.read()[-3000:]}"
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "final").exists()
    survivor = latest_checkpoint(run_dir / "checkpoints")
    killed_at = max(read_losses(run_dir))
    assert survivor is not None and 3 <= read_checkpoint_metadata(survivor)["step"] <= killed_at, seed
    # Leftovers of a crash mid-write must never be picked: a temp folder and a folder without marker.
    (run_dir / "checkpoints" / f".tmp-{checkpoint_name(99)}").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / checkpoint_name(98)).mkdir()
    assert latest_checkpoint(run_dir / "checkpoints") == survivor

    resumed = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), *cli_args(overrides), "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(run_dir), final_weights(reference.output_dir))
    losses = read_losses(run_dir)  # both runs appended: resumed steps overwrite the replayed ones
    for step, loss in reference.losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-6), (step, seed)


def test_latest_checkpoint_only_returns_complete_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        folder = root / checkpoint_name(step)
        folder.mkdir(parents=True)
        if step != 9:  # 9 was being written when the process died: no marker
            (folder / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    (root / f".tmp-{checkpoint_name(12)}").mkdir()
    (root / "notes").mkdir()
    assert [s for s, _ in list_complete_checkpoints(root)] == [3, 6]
    assert latest_checkpoint(root) == root / checkpoint_name(6)
    assert latest_checkpoint(tmp_path / "missing") is None


def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resume_recovers(
    reference, workspace, tmp_path, monkeypatch
):
    real_save = accelerate.accelerator.save_accelerator_state
    calls = []

    def disk_fills_on_second_save(output_dir, *args, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            Path(output_dir, "model.safetensors").write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(output_dir, *args, **kwargs)

    monkeypatch.setattr(accelerate.accelerator, "save_accelerator_state", disk_fills_on_second_save)
    run_dir = tmp_path / "full_disk"
    config = tiny_config(workspace, run_dir)
    with pytest.raises(CheckpointError) as info:
        train(config)
    message = str(info.value)
    assert checkpoint_name(6) in message and "No space left on device" in message and "intact" in message
    checkpoints = run_dir / "checkpoints"
    assert [s for s, _ in list_complete_checkpoints(checkpoints)] == [3]
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]
    assert not (run_dir / "final").exists()
    # The surviving checkpoint is exactly the reference run's state after step 3.
    step3 = f"{checkpoint_name(3)}/model.safetensors"
    assert_same_weights(
        load_file(str(checkpoints / step3)), load_file(str(reference.output_dir / "checkpoints" / step3))
    )

    monkeypatch.setattr(accelerate.accelerator, "save_accelerator_state", real_save)
    resumed = train(tiny_config(workspace, run_dir, training__resume=True))
    assert resumed.resumed_from == checkpoints / checkpoint_name(3)
    assert min(resumed.losses) == 4
    assert_same_weights(final_weights(run_dir), final_weights(reference.output_dir))


def test_resume_refuses_a_changed_model_and_a_fresh_run_refuses_a_used_folder(reference, workspace):
    with pytest.raises(ValueError, match=r"config model changed since the checkpoint"):
        train(tiny_config(workspace, reference.output_dir, model__hidden_size=64, training__resume=True))
    with pytest.raises(ValueError, match=r"already holds a run .*--resume"):
        train(tiny_config(workspace, reference.output_dir))


# ---------------------------------------------------------------------------------------------- non-finite loss


def _poison_training_loss(monkeypatch, bad_steps: set[int], value: float) -> list[HfAttnForCausalLM]:
    """Make the training loss ``value`` (NaN/inf, with a gradient) at the given steps; return the model."""
    original = HfAttnForCausalLM.forward
    seen: list[HfAttnForCausalLM] = []
    counter = {"calls": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training and out.loss is not None:
            counter["calls"] += 1
            if not seen:
                seen.append(self)
            if counter["calls"] in bad_steps:
                out.loss = out.loss * value  # nan * x = nan; inf * x = inf, and the gradient follows
        return out

    monkeypatch.setattr(HfAttnForCausalLM, "forward", forward)
    return seen


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_loss_stops_with_a_clear_message_and_untouched_weights(
    workspace, tmp_path, monkeypatch, value
):
    model = _poison_training_loss(monkeypatch, {5}, value)
    run_dir = tmp_path / "stop"
    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_config(workspace, run_dir, training__max_steps=6))
    assert "at step 5" in str(info.value) and "on_nonfinite_loss=skip" in str(info.value)
    assert str(run_dir / "checkpoints" / checkpoint_name(3)) in str(info.value)
    assert not (run_dir / "final").exists()
    weights = model[0].state_dict()
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_nonfinite_loss_can_skip_the_step_instead(workspace, tmp_path, monkeypatch):
    model = _poison_training_loss(monkeypatch, {4}, float("nan"))
    result = train(
        tiny_config(workspace, tmp_path / "skip", training__max_steps=6, training__on_nonfinite_loss="skip")
    )
    assert result.skipped_steps == 1
    assert sorted(result.losses) == [1, 2, 3, 5, 6]
    assert all(math.isfinite(x) for x in result.losses.values())
    assert all(torch.isfinite(t).all() for t in model[0].state_dict().values())
    assert math.isfinite(result.final_eval["perplexity"])
    assert json.loads((tmp_path / "skip" / "final" / "train_results.json").read_text())["skipped_steps"] == 1


def test_too_many_skipped_steps_in_a_row_stop(workspace, tmp_path, monkeypatch):
    _poison_training_loss(monkeypatch, {2, 3, 4}, float("nan"))
    config = tiny_config(
        workspace,
        tmp_path / "skips",
        training__max_steps=6,
        training__on_nonfinite_loss="skip",
        training__max_consecutive_skips=2,
    )
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        train(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on a GPU")
def test_fp16_without_a_gpu_is_refused_before_training(workspace, tmp_path):
    with pytest.raises(ValueError, match=r"training.mixed_precision='fp16' is invalid on this machine"):
        train(tiny_config(workspace, tmp_path / "fp16", training__mixed_precision="fp16"))
    assert not (tmp_path / "fp16").exists()
