"""Publishing to the Hub with the upload intercepted at HfApi.create_commit (no network).

What a push sends is checked file by file, the card's metadata is parsed back, and the sent files are
loaded with trust_remote_code=True in a subprocess where hf_attn cannot be imported.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from finetune_helpers import (  # noqa: F401
    PACKAGE_DIR,
    HubRecorder,
    expected_code_files,
    pretrained_checkpoint,
    single_thread,
    training_args,
    write_files,
)
from huggingface_hub import ModelCard
from remote_code import run_without_hf_attn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from hf_attn.finetune import DataArguments, ModelArguments, run_finetune
from hf_attn.finetune.hub import facts_from_card
from hf_attn.hub_hf_attn import plan_upload, push_model_to_hub
from hf_attn.modelcard_hf_attn import write_model_card

REPO_ROOT = PACKAGE_DIR.parent
TEXT = "def get_payload(self, i=None, decode=False):\n    if self.is_multipart():\n        return self._payload"


def _tokenizer_files(folder: Path) -> set[str]:
    """What saving the folder's tokenizer writes, by saving it again elsewhere (an independent list)."""
    tmp = folder.parent / f"{folder.name}-tokenizer-only"
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
    return {p.name for p in tmp.iterdir()}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A short classification fine-tune run with --push_to_hub, intermediate checkpoints and a test split."""
    out = tmp_path_factory.mktemp("hub") / "tiny-cls"
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder = HubRecorder().install(monkeypatch)
        run_finetune(
            ModelArguments(model_name_or_path=str(pretrained_checkpoint())),
            DataArguments(max_seq_length=32, max_train_samples=64, max_eval_samples=32),
            training_args(
                out, do_train=True, do_eval=True, do_predict=True, max_steps=4, save_strategy="steps", save_steps=2,
                push_to_hub=True, hub_model_id="test-user/tiny-cls", hub_private_repo=True,
            ),
        )
    return out, recorder


@pytest.fixture
def hub(monkeypatch) -> HubRecorder:
    return HubRecorder().install(monkeypatch)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _expected_checkpoint_files(folder: Path) -> set[str]:
    return {"README.md", "config.json", "model.safetensors"} | expected_code_files() | _tokenizer_files(folder)


def _logits_without_hf_attn(repo: Path, auto_class: str, cwd: Path) -> torch.Tensor:
    """Load ``repo`` with trust_remote_code in a fresh interpreter that cannot import hf_attn; return logits."""
    run_without_hf_attn(
        f"""
        import torch
        from transformers import {auto_class}, AutoTokenizer
        torch.set_num_threads(1)
        model = {auto_class}.from_pretrained({str(repo)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        tokenizer = AutoTokenizer.from_pretrained({str(repo)!r})
        with torch.no_grad():
            logits = model(**tokenizer({TEXT!r}, return_tensors="pt")).logits
        torch.save(logits, "logits.pt")
        """,
        cwd=cwd,
    )
    return torch.load(cwd / "logits.pt")


# ---- Trainer run with --push_to_hub --------------------------------------------------------------


def test_trainer_push_uploads_exactly_the_model_files(finetuned):
    out, recorder = finetuned
    assert [r["repo_id"] for r in recorder.repos] == ["test-user/tiny-cls"] and recorder.repos[0]["private"] is True
    assert len(recorder.commits) == 1  # once, at the end: no intermediate pushes of training state
    commit = recorder.commits[0]
    assert commit["commit_message"] == "End of training"
    assert set(commit["files"]) == _expected_checkpoint_files(out)
    assert (out / "training_args.bin").is_file() and (out / "checkpoint-2").is_dir()  # present, not uploaded
    assert commit["files"]["model.safetensors"] == (out / "model.safetensors").read_bytes()


def test_card_carries_the_measured_results(finetuned):
    out, recorder = finetuned
    card = ModelCard(recorder.commits[0]["files"]["README.md"].decode())
    measured = json.loads((out / "test_results.json").read_text())
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"accuracy", "f1", "loss"}
    for name, result in results.items():
        assert result.metric_value == pytest.approx(measured[f"test_{name}"])
        assert result.task_type == "text-classification" and result.dataset_split == "test"
        assert result.dataset_type == "hf_attn:stdlib-modules"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert {"hf_attn", "eager-attention"} <= set(card.data.tags)
    assert "test-user/tiny-cls" in card.text  # the loading example names the repo


def test_pushed_files_load_without_hf_attn_and_give_identical_logits(finetuned, tmp_path):
    out, recorder = finetuned
    repo = write_files(recorder.commits[0]["files"], tmp_path / "clone")
    remote = _logits_without_hf_attn(repo, "AutoModelForSequenceClassification", tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        local = model(**tokenizer(TEXT, return_tensors="pt")).logits
    torch.testing.assert_close(remote, local, rtol=0, atol=0)


# ---- scripts/push_to_hub.py ----------------------------------------------------------------------


def test_script_pushes_the_same_files_with_a_card_naming_the_repo(finetuned, hub, capsys):
    out, trainer_recorder = finetuned
    assert _load_script("push_to_hub").main([str(out), "test-user/copy", "--public", "--commit_message", "hi"]) == 0
    assert hub.repos[0]["repo_id"] == "test-user/copy" and hub.repos[0]["private"] is False
    files = hub.commits[0]["files"]
    assert set(files) == set(trainer_recorder.commits[0]["files"])
    assert hub.commits[0]["commit_message"] == "hi"
    printed = capsys.readouterr().out
    assert "skipped training_args.bin: pickle" in printed and "skipped checkpoint-2/" in printed
    # the card is re-rendered for the new repo and keeps the folder card's facts
    pushed, local = ModelCard(files["README.md"].decode()), ModelCard.load(out / "README.md")
    assert 'model="test-user/copy"' in pushed.text and 'model="test-user/copy"' not in local.text
    assert pushed.data.eval_results == local.data.eval_results and pushed.data.tags == local.data.tags
    assert pushed.text.split("## Training data")[1] == local.text.split("## Training data")[1]
    assert pushed.data.eval_results[0].dataset_type == "hf_attn:stdlib-modules"


def test_script_keep_card_uploads_the_readme_untouched(finetuned, hub):
    out, _ = finetuned
    _load_script("push_to_hub").main([str(out), "test-user/copy", "--keep_card"])
    assert hub.commits[0]["files"]["README.md"] == (out / "README.md").read_bytes()


def test_facts_from_card_round_trip(tmp_path):
    config = tiny_config("local", architectures=["HfAttnForSequenceClassification"], num_labels=2)
    facts = {
        "eval_results": {"accuracy": 0.75, "f1": 0.5}, "eval_dataset": "user/data", "eval_dataset_name": "Data",
        "eval_split": "test", "datasets": ["user/data"], "base_model": "user/base", "license": "mit",
        "tags": ["mine"], "training_data": "Some *markdown*\n\nin two paragraphs.", "intended_use": "Tests.",
    }
    write_model_card(tmp_path, config, {**facts, "model_name": "a"})
    assert facts_from_card(tmp_path / "README.md") == facts


def test_script_dry_run_uploads_nothing(finetuned, hub, capsys):
    out, _ = finetuned
    _load_script("push_to_hub").main([str(out), "test-user/copy", "--dry_run"])
    assert hub.repos == [] and hub.commits == []
    assert "model.safetensors" in capsys.readouterr().out


def test_script_renders_a_card_from_model_card_data(finetuned, hub, tmp_path):
    out, _ = finetuned
    folder = tmp_path / "no-card"
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns("checkpoint-*", "README.md"))
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps({"eval_results": {"accuracy": 0.5}, "datasets": ["user/data"]}))
    _load_script("push_to_hub").main([str(folder), "test-user/new", "--model_card_data", str(facts)])
    card = ModelCard(hub.commits[0]["files"]["README.md"].decode())
    assert card.data.eval_results[0].metric_value == 0.5 and card.data.datasets == ["user/data"]
    assert not (folder / "README.md").exists()  # the folder itself is left untouched


# ---- what may and may not be uploaded ------------------------------------------------------------


def _copy(out: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    return folder


def test_pickle_weights_are_refused_or_skipped(finetuned, tmp_path):
    folder = _copy(finetuned[0], tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    plan = plan_upload(folder)  # safetensors present: the pickle is skipped
    assert "pytorch_model.bin" in plan.skipped and "pytorch_model.bin" not in plan.files
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \*\.safetensors.*pickle weights \['pytorch_model.bin'\]"):
        plan_upload(folder)


def test_missing_code_or_auto_map_is_refused(finetuned, tmp_path):
    folder = _copy(finetuned[0], tmp_path)
    (folder / "attention_local.py").unlink()
    with pytest.raises(ValueError, match="attention_local.py"):
        plan_upload(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="auto_map"):
        plan_upload(folder)
    with pytest.raises(ValueError, match="not a directory"):
        plan_upload(folder / "config.json")


def test_stray_python_files_are_not_uploaded(finetuned, tmp_path):
    folder = _copy(finetuned[0], tmp_path)
    (folder / "my_experiment.py").write_text("print('not model code')\n")
    plan = plan_upload(folder)
    assert "my_experiment.py" in plan.skipped and set(plan.files) == _expected_checkpoint_files(finetuned[0])


# ---- model.push_to_hub ---------------------------------------------------------------------------


def _pretrained_lm() -> AutoModelForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(pretrained_checkpoint())
    model.model_card_data = {"eval_results": {"perplexity": 12.5}, "datasets": ["user/data"], "eval_split": "validation"}
    return model


# transformers' PreTrainedModel.push_to_hub replaces README.md with the Hub's card or a generic template,
# so HfAttnPreTrainedModel overrides push_to_hub: hf_attn's card (and its eval results) must survive.
@pytest.mark.parametrize("via", ["model.push_to_hub", "push_model_to_hub"])
def test_model_push_to_hub(via, hub, tmp_path):
    model = _pretrained_lm()
    if via == "model.push_to_hub":
        model.push_to_hub("test-user/tiny-lm", private=True, tags=["my-tag"])
    else:
        push_model_to_hub(model, "test-user/tiny-lm", private=True, tags=["my-tag"])
    assert hub.repos[0]["repo_id"] == "test-user/tiny-lm" and hub.repos[0]["private"] is True
    files = hub.commits[0]["files"]
    assert set(files) == {"README.md", "config.json", "generation_config.json", "model.safetensors"} | expected_code_files()
    card = ModelCard(files["README.md"].decode())
    assert card.data.eval_results[0].metric_type == "perplexity" and card.data.eval_results[0].metric_value == 12.5
    assert {"hf_attn", "eager-attention", "my-tag"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-generation"
    auto_map = json.loads(files["config.json"])["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_hf_attn.HfAttnForCausalLM"

    if via != "model.push_to_hub":
        return  # same files; loading them once (below) is enough
    repo = write_files(files, tmp_path / "clone")
    shutil.copy(pretrained_checkpoint() / "tokenizer.json", repo)  # the model push carries no tokenizer
    shutil.copy(pretrained_checkpoint() / "tokenizer_config.json", repo)
    remote = _logits_without_hf_attn(repo, "AutoModelForCausalLM", tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(pretrained_checkpoint())
    with torch.no_grad():
        local = model(**tokenizer(TEXT, return_tensors="pt")).logits
    torch.testing.assert_close(remote, local, rtol=0, atol=0)
