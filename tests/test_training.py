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
import shutil
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
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_attn import ATTENTION_MODES, HfAttnForCausalLM
from hf_attn.metrics import available_metrics, load_metric
from hf_attn.training import CheckpointError, NonFiniteLossError, load_config, resume_command, train
from hf_attn.training.checkpoint import (
    COMPLETE_MARKER,
    checkpoint_name,
    latest_checkpoint,
    list_complete_checkpoints,
    read_checkpoint_metadata,
    save_checkpoint,
)
from hf_attn.training.config import apply_overrides, config_from_dict, save_config
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


def launch(
    workspace: dict[str, Path], accelerate_config: str, script_args: list[str], *launcher_args: str
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/<accelerate_config> scripts/train.py ...``."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / "accelerate" / accelerate_config),
        *launcher_args,
        "--main_process_port",
        str(_free_port()),
        str(TRAIN_SCRIPT),
        *script_args,
    ]
    return subprocess.run(command, env=subprocess_env(workspace), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def ddp_run(workspace) -> Path:
    """The reference run as DDP over 2 CPU processes (2 x 2 blocks = the reference's 4), via cpu_ddp.yaml."""
    run_dir = workspace["root"] / "ddp"
    overrides = tiny_overrides(workspace, run_dir, training__per_device_batch_size=2)
    proc = launch(workspace, "cpu_ddp.yaml", cli_args(overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_two_processes_match_one_process_with_the_same_global_batch(reference, ddp_run):
    run_dir = ddp_run
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
    with pytest.raises(ValueError, match=r"config model.hidden_size changed since the checkpoint"):
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


# ---------------------------------------------------------------------------------------------- numbers in YAML


def test_exponent_floats_are_numbers_on_the_command_line_and_in_files(workspace, tmp_path):
    # PyYAML (YAML 1.1) reads 5e-3 as the string '5e-3'; everyone writes learning rates that way.
    config = load_config(None, ["--training.learning_rate", "5e-3", "--training.adam_epsilon=1E-6"])
    assert config.training.learning_rate == 0.005 and config.training.adam_epsilon == 1e-6
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  rope_theta: 1e4\ntraining:\n  learning_rate: 5e-3\n  weight_decay: 1e-2\n")
    config = load_config(path)
    assert config.model["rope_theta"] == 10000.0 and isinstance(config.model["rope_theta"], float)
    assert (config.training.learning_rate, config.training.weight_decay) == (0.005, 0.01)
    # A quoted number stays a string and is refused, naming the key.
    with pytest.raises(
        ValueError, match=r"training.learning_rate='5e-3' is invalid: expected a number .*got a str"
    ):
        load_config(None, ["--training.learning_rate", "'5e-3'"])


# ---------------------------------------------------------------------------------------------- config.yaml


def test_config_yaml_is_replaced_atomically(workspace, tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(tiny_config(workspace, tmp_path), path)
    before = path.read_text()
    real_dump = yaml.safe_dump

    def dump_half_then_fail(data, stream=None, **kwargs):
        if stream is not None:  # writing straight into the target truncates it first
            stream.write(real_dump(data, **kwargs)[:20])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_dump(data, **kwargs)

    def replace_fails(src, dst):  # the disk fills (or the process dies) before the rename
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(yaml, "safe_dump", dump_half_then_fail)
    monkeypatch.setattr(os, "replace", replace_fails)
    with pytest.raises(OSError, match="No space left"):
        save_config(tiny_config(workspace, tmp_path, training__max_steps=99), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left behind


@pytest.mark.parametrize(
    "content", ["", "model: [unclosed\n  - ", "\x00\x01 not yaml: : :"], ids=["empty", "corrupt", "binary"]
)
def test_an_empty_or_corrupt_config_yaml_does_not_block_resume(reference, workspace, tmp_path, content):
    run_dir = tmp_path / "run"
    shutil.copytree(reference.output_dir, run_dir)
    (run_dir / "config.yaml").write_text(content)
    # The checkpoint carries the config it was written with: a changed model is still refused.
    with pytest.raises(ValueError, match=r"config model.hidden_size changed"):
        train(tiny_config(workspace, run_dir, model__hidden_size=64, training__resume=True))
    resumed = train(tiny_config(workspace, run_dir, training__resume=True))
    assert resumed.resumed_from == run_dir / "checkpoints" / checkpoint_name(MAX_STEPS)
    assert_same_weights(final_weights(run_dir), final_weights(reference.output_dir))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["max_steps"] == MAX_STEPS


# ---------------------------------------------------------------------------------------------- resume honesty


def test_resume_applies_a_changed_schedule_and_optimizer(reference, workspace, tmp_path, capsys):
    run_dir = tmp_path / "longer"
    shutil.copytree(reference.output_dir, run_dir)
    changed = {
        "training__max_steps": 15,
        "training__learning_rate": 2e-3,
        "training__warmup_steps": 4,
        "training__weight_decay": 0.05,
        "training__adam_beta2": 0.99,
    }
    resumed = train(tiny_config(workspace, run_dir, training__resume=True, **changed))
    assert sorted(resumed.losses) == [13, 14, 15]
    out = capsys.readouterr().out
    assert "training.max_steps: 12 -> 15" in out and "training.learning_rate: 0.005 -> 0.002" in out
    # The cosine is rebuilt to end at the new max_steps with the new peak and warmup, not left at
    # the old run's minimum (5e-4 from step 12 on).
    schedule = WarmupCosine(warmup=4, total=15, min_ratio=0.1)
    logged = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/lr" in row:
            logged[row["step"]] = row["train/lr"]
    for step in (13, 14, 15):
        assert logged[step] == pytest.approx(2e-3 * schedule(step), rel=1e-12), step
    optimizer = torch.load(run_dir / "checkpoints" / checkpoint_name(15) / "optimizer.bin", weights_only=True)
    groups = optimizer["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(tuple(g["betas"]) == (0.9, 0.99) and g["initial_lr"] == 2e-3 for g in groups)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["max_steps"] == 15


def test_resume_on_another_number_of_processes_keeps_the_global_batch_or_is_refused(
    reference, ddp_run, workspace, tmp_path
):
    run_dir = tmp_path / "from_ddp"
    shutil.copytree(ddp_run, run_dir)
    # 2 processes x 2 blocks were 4 blocks per step; 1 process x 2 would silently halve it.
    with pytest.raises(ValueError) as info:
        train(tiny_config(workspace, run_dir, training__per_device_batch_size=2, training__resume=True))
    message = str(info.value)
    for fragment in (
        "global batch would change from 4 to 2",
        "training.per_device_batch_size x processes x training.gradient_accumulation_steps",
        "2 x 2 x 1 -> 2 x 1 x 1",
        "--training.per_device_batch_size 4",
    ):
        assert fragment in message
    # 1 process x 4 blocks keeps the global batch: the run continues on the reference's trajectory.
    for step in (9, 12):
        shutil.rmtree(run_dir / "checkpoints" / checkpoint_name(step))
    shutil.rmtree(run_dir / "final")
    resumed = train(tiny_config(workspace, run_dir, training__per_device_batch_size=4, training__resume=True))
    assert resumed.resumed_from == run_dir / "checkpoints" / checkpoint_name(6)
    assert sorted(resumed.losses) == list(range(7, MAX_STEPS + 1))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(reference.losses[step], rel=1e-5), step
    assert_same_weights(final_weights(run_dir), final_weights(reference.output_dir), atol=1e-5)


# ---------------------------------------------------------------------------------------------- stop signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_checkpoints_the_step_and_resume_ends_with_the_same_weights(
    reference, workspace, tmp_path, sig
):
    run_dir = tmp_path / "stopped"
    overrides = tiny_overrides(workspace, run_dir)
    proc = subprocess.Popen(
        _slow_training_command(overrides),
        env=subprocess_env(workspace),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and max(read_losses(run_dir), default=0) >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"run ended before step 4: {proc.stdout.read()[-3000:]}"
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, output[-3000:]
    stopped_at = max(read_losses(run_dir))
    assert 4 <= stopped_at < MAX_STEPS
    assert f"stopped by {sig.name} after step {stopped_at} of {MAX_STEPS}" in output
    assert f"resume with: {resume_command(str(TRAIN_SCRIPT), None, cli_args(overrides))}\n" in output
    assert latest_checkpoint(run_dir / "checkpoints") == run_dir / "checkpoints" / checkpoint_name(stopped_at)
    assert not (run_dir / "final").exists()

    # What the printed command does (the SIGKILL test runs that command itself).
    resumed = train(tiny_config(workspace, run_dir, training__resume=True))
    assert min(resumed.losses) == stopped_at + 1
    assert_same_weights(final_weights(run_dir), final_weights(reference.output_dir))


# ---------------------------------------------------------------------------------------------- full disk


def _enospc(folder: str) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _torch_wrapping_enospc(folder: str) -> None:
    try:
        _enospc(folder)
    except OSError as err:
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0"
        ) from err


def _torch_zip_writer_on_a_full_disk(folder: str) -> None:
    # What torch.save really raises when the disk fills: no errno, nothing about space.
    if Path("/dev/full").exists():
        torch.save({"weights": torch.zeros(1000)}, "/dev/full")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize(
    "save_state",
    [_enospc, _torch_wrapping_enospc, _torch_zip_writer_on_a_full_disk],
    ids=["oserror", "torch-wrapped-oserror", "torch-zip-writer"],
)
def test_a_full_disk_is_named_in_the_checkpoint_error(tmp_path, save_state):
    accelerator = Accelerator()
    accelerator.save_state = save_state
    root = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(accelerator, root, 6, keep=2)
    message = str(info.value)
    assert "No space left on device" in message and "ENOSPC" in message and "MiB free" in message
    assert str(root / checkpoint_name(6)) in message and "previous checkpoint is intact" in message
    assert "inline_container" not in message  # torch's own text stays in the chained exception
    assert list(root.iterdir()) == []


# ---------------------------------------------------------------------------------------------- FSDP


def test_fsdp_config_runs_on_cpu_matches_ddp_step_by_step_and_resumes(ddp_run, workspace, tmp_path):
    run_dir = tmp_path / "fsdp"
    args = cli_args(tiny_overrides(workspace, run_dir, training__per_device_batch_size=2))
    on_two_cpu_processes = ("--num_processes", "2", "--mixed_precision", "no")
    proc = launch(workspace, "fsdp.yaml", args, *on_two_cpu_processes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) (FSDP)" in proc.stdout  # not DDP in disguise
    assert (run_dir / "checkpoints" / checkpoint_name(9) / "pytorch_model_fsdp_0").is_dir()  # sharded
    losses, ddp_losses = read_losses(run_dir), read_losses(ddp_run)
    assert losses.keys() == ddp_losses.keys() == set(range(1, MAX_STEPS + 1))
    for step, loss in ddp_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    fsdp_weights = final_weights(run_dir)
    # reduce-scatter and all-reduce sum in different orders; Adam's normalised step turns the last-bit
    # gradient differences into ~1e-5 weight differences after 10 steps
    assert_same_weights(fsdp_weights, final_weights(ddp_run), atol=3e-5)

    # Resume the sharded checkpoint of step 9: the same final weights as the uninterrupted FSDP run.
    shutil.rmtree(run_dir / "checkpoints" / checkpoint_name(12))
    shutil.rmtree(run_dir / "final")
    proc = launch(workspace, "fsdp.yaml", [*args, "--resume"], *on_two_cpu_processes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / checkpoint_name(9)} at step 9" in proc.stdout
    assert_same_weights(final_weights(run_dir), fsdp_weights)
    # One process cannot load shards written by two.
    with pytest.raises(ValueError, match=r"sharded by FSDP by 2 process\(es\) .* same number of processes"):
        train(tiny_config(workspace, run_dir, training__per_device_batch_size=4, training__resume=True))
