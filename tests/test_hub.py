"""Publishing to the Hub with the upload intercepted at HfApi.create_commit (no network).

What a push sends is checked file by file, the card's metadata is parsed back, and the sent files are
loaded with trust_remote_code=True in a subprocess where hf_attn cannot be imported.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from datasets import Dataset
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
    Trainer,
)

from hf_attn.finetune import DataArguments, HfAttnTrainer, ModelArguments, run_finetune
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
    # one sentence: "... has no *.safetensors weights; it has pickle weights [...]: re-save them ..."
    with pytest.raises(
        ValueError, match=r"has no \*\.safetensors weights; it has pickle weights \['pytorch_model.bin'\]: re-save them"
    ):
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


# ---- files are judged by where they lead, their size and their content ---------------------------


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot for the Hub\n")
    return secret


def test_script_refuses_a_symlink_out_of_the_folder(finetuned, hub, tmp_path, capsys):
    folder = _copy(finetuned[0], tmp_path)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(_secret(tmp_path))
    for extra in (["--dry_run"], []):
        assert _load_script("push_to_hub").main([str(folder), "test-user/copy", *extra]) == 2
        err = capsys.readouterr().err
        assert "tokenizer.json: symlink to" in err and "outside the folder" in err
    assert hub.repos == [] and hub.commits == []


def test_symlink_inside_the_folder_is_followed(finetuned, tmp_path):
    folder = _copy(finetuned[0], tmp_path)
    (folder / "shared").mkdir()
    (folder / "tokenizer.json").rename(folder / "shared" / "tokenizer.json")
    (folder / "tokenizer.json").symlink_to(Path("shared") / "tokenizer.json")
    plan = plan_upload(folder)
    assert "tokenizer.json" in plan.files and set(plan.files) == _expected_checkpoint_files(finetuned[0])


def _pickle_bytes(folder: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(4)}, buffer)  # what a renamed pytorch_model.bin holds
    return buffer.getvalue()


def _truncated_safetensors(folder: Path) -> bytes:
    data = (folder / "model.safetensors").read_bytes()
    return data[: len(data) // 2]  # a copy interrupted half-way


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("model.safetensors", _pickle_bytes, "model.safetensors: not a safetensors file"),
        ("model.safetensors", _truncated_safetensors, "model.safetensors: incomplete or corrupt safetensors file"),
        ("extra.safetensors", lambda folder: b"\x08" + b"\0" * 7 + b"not json", "extra.safetensors: not a safetensors"),
        ("tokenizer_config.json", lambda folder: b'{"truncated": ', "tokenizer_config.json: not valid JSON"),
        ("generation_config.json", lambda folder: b"[1, 2]", "generation_config.json: JSON but not an object"),
        ("tokenizer.model", _pickle_bytes, "tokenizer.model: a pickle"),
        ("merges.txt", lambda folder: b"\xff\xfe\x00binary", "merges.txt: not UTF-8 text"),
    ],
    ids=["renamed-pickle", "truncated", "bad-header", "bad-json", "json-list", "pickle-tokenizer", "binary-text"],
)
def test_files_are_judged_by_content_not_name(finetuned, tmp_path, name, content, message):
    folder = _copy(finetuned[0], tmp_path)
    (folder / name).write_bytes(content(folder))
    with pytest.raises(ValueError, match="refusing to upload") as info:
        plan_upload(folder)
    assert message in str(info.value)


def test_script_max_file_size_refuses_larger_files(finetuned, hub, capsys):
    out, _ = finetuned
    size = (out / "model.safetensors").stat().st_size
    assert size > 10_000
    assert _load_script("push_to_hub").main([str(out), "test-user/copy", "--max_file_size", "10KB"]) == 2
    err = capsys.readouterr().err
    assert f"model.safetensors: {size / 1000:.1f} kB ({size} bytes), over max_file_size = 10.0 kB (10000 bytes)" in err
    assert hub.commits == []
    largest = max(p.stat().st_size for p in out.iterdir() if p.is_file())
    assert _load_script("push_to_hub").main([str(out), "test-user/copy", "--max_file_size", str(largest)]) == 0
    assert len(hub.commits) == 1


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


def test_model_push_to_hub_max_file_size(hub):
    with pytest.raises(ValueError, match=r"model\.safetensors: .* bytes\), over max_file_size = 1\.0 kB"):
        _pretrained_lm().push_to_hub("test-user/tiny-lm", max_file_size="1KB")
    assert hub.commits == []


def test_save_pretrained_push_refuses_a_symlink_out_of_the_folder(hub, tmp_path):
    folder = tmp_path / "save"
    folder.mkdir()
    (folder / "tokenizer.json").symlink_to(_secret(tmp_path))  # left over in the save folder
    with pytest.raises(ValueError, match=r"tokenizer\.json: symlink to .*id_rsa, outside the folder"):
        _pretrained_lm().save_pretrained(folder, push_to_hub=True, repo_id="test-user/tiny-lm")
    assert hub.commits == []


# ---- Trainer.push_to_hub -------------------------------------------------------------------------


def _random_blocks(n: int = 32, length: int = 16) -> Dataset:
    ids = torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def test_plain_trainer_push_uploads_pickles_and_its_own_card(hub, tmp_path):
    """Why HfAttnTrainer exists, and proof that the recorder sees Trainer's upload route (upload_folder
    commits through HfApi.create_commit): transformers' Trainer sends training_args.bin and a generic card."""
    trainer = Trainer(
        model=_pretrained_lm(), args=training_args(tmp_path / "plain", hub_model_id="test-user/plain"),
        processing_class=AutoTokenizer.from_pretrained(pretrained_checkpoint()),
    )
    trainer.push_to_hub()
    files = hub.commits[-1]["files"]
    assert "training_args.bin" in files
    assert "hf_attn" not in (ModelCard(files["README.md"].decode()).data.tags or [])


def test_hf_attn_trainer_pushes_only_allowed_files_with_the_hf_attn_card(hub, tmp_path):
    out = tmp_path / "trainer-run"
    trainer = HfAttnTrainer(
        model=_pretrained_lm(),
        args=training_args(out, max_steps=4, save_strategy="steps", save_steps=2, push_to_hub=True,
                           hub_model_id="test-user/tiny-trainer", hub_strategy="every_save"),
        train_dataset=_random_blocks(),
        processing_class=AutoTokenizer.from_pretrained(pretrained_checkpoint()),
    )
    trainer.train()
    commit = trainer.push_to_hub(tags=["extra"])
    assert commit.repo_url.repo_id == "test-user/tiny-trainer"
    assert [c["commit_message"] for c in hub.commits] == [
        "Training in progress, step 2", "Training in progress, step 4", "End of training",
    ]
    expected = {"README.md", "config.json", "generation_config.json", "model.safetensors"}
    expected |= expected_code_files() | _tokenizer_files(pretrained_checkpoint())
    for pushed in hub.commits:
        assert set(pushed["files"]) == expected, pushed["commit_message"]
    assert (out / "training_args.bin").is_file()  # written by Trainer, never uploaded
    card = ModelCard(hub.commits[-1]["files"]["README.md"].decode())
    assert card.data.model_name == "tiny-trainer" and 'from_pretrained("test-user/tiny-trainer"' in card.text
    assert {"hf_attn", "eager-attention", "extra"} <= set(card.data.tags)
    assert card.data.eval_results[0].metric_value == 12.5  # the model's own card facts survive
    # an intermediate push names the repo too, not "checkpoint-2"
    assert ModelCard(hub.commits[0]["files"]["README.md"].decode()).data.model_name == "tiny-trainer"


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_hf_attn_trainer_refuses_hub_strategies_that_upload_optimizer_pickles(hub, tmp_path, strategy):
    with pytest.raises(ValueError, match=f"hub_strategy: '{strategy}'.*pickles"):
        HfAttnTrainer(
            model=_pretrained_lm(),
            args=training_args(tmp_path, push_to_hub=True, hub_model_id="test-user/x", hub_strategy=strategy),
        )
    assert hub.repos == []
