"""Model card template, renderer and metadata (hf_attn/modelcard_hf_attn.py, model_card.md)."""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import MODE_IDS, MODE_VARIANTS, tiny_config
from finetune_helpers import PACKAGE_DIR, single_thread  # noqa: F401
from huggingface_hub import ModelCard

from hf_attn import HfAttnForCausalLM, HfAttnForSequenceClassification
from hf_attn.modelcard_hf_attn import (
    MODEL_CARD_DATA_KEYS,
    TEMPLATE_PATH,
    attention_parameters,
    render_template,
    strip_local_paths,
    write_model_card,
)
from hf_attn.training.checkpoint import publish_folder_atomically
from hf_attn.training.config import DataConfig
from hf_attn.training.data import describe_corpus, stdlib_root

REPO_ROOT = PACKAGE_DIR.parent
ARCHITECTURES = {
    "HfAttnForCausalLM": "text-generation",
    "HfAttnForSequenceClassification": "text-classification",
    "HfAttnModel": "feature-extraction",
}


def test_template_ships_inside_the_package_as_a_symlink():
    link = PACKAGE_DIR / "model_card.md"
    assert link.is_symlink() and not Path(link.readlink()).is_absolute()
    assert link.resolve() == (REPO_ROOT / "model_card.md").resolve()
    assert TEMPLATE_PATH == link


def test_render_template_fills_and_rejects_missing_values():
    assert render_template("a {{ x }} b {{y}} {x}", {"x": 1, "y": "two"}) == "a 1 b two {x}"
    with pytest.raises(ValueError, match="missing|no value.*'y'"):
        render_template("{{ x }} {{ y }}", {"x": 1})


@pytest.mark.parametrize("mode, position", MODE_VARIANTS, ids=MODE_IDS)
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_card_metadata_per_mode_and_head(tmp_path, mode, position, architecture):
    config = tiny_config(mode, position, architectures=[architecture], num_labels=3)
    data = {
        "datasets": ["user/some-data"],
        "eval_results": {"accuracy": 0.75, "f1": 0.5},
        "eval_split": "validation",
        "base_model": "user/base",
        "tags": ["extra"],
    }
    path = write_model_card(tmp_path, config, data)
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    meta = card.data
    assert meta.library_name == "transformers"
    assert meta.pipeline_tag == ARCHITECTURES[architecture]
    assert {"hf_attn", f"{mode}-attention", "extra"} <= set(meta.tags)
    assert meta.datasets == ["user/some-data"] and meta.base_model == "user/base"
    assert meta.license == "apache-2.0"
    results = {r.metric_type: r for r in meta.eval_results}
    assert {k: r.metric_value for k, r in results.items()} == {"accuracy": 0.75, "f1": 0.5}
    assert all(r.task_type == ARCHITECTURES[architecture] and r.dataset_split == "validation" for r in results.values())
    block = meta.to_dict()["hf_attn"]
    assert block["attention_mode"] == mode and block["position_embedding_type"] == config.position_embedding_type
    expected_keys = {"local": "sliding_window", "lowrank": "lowrank_dim"}.get(mode)
    if expected_keys:
        assert block[expected_keys] == getattr(config, expected_keys)
    if config.position_embedding_type == "rope":
        assert block["rope_theta"] == config.rope_theta
    # the body: rendered (no placeholder left), names the mode and its settings, shows the results
    assert "{{" not in card.text and "Settings of this checkpoint's mode" in card.text
    assert f"**`{mode}`**" in card.text and "| accuracy | 0.75 |" in card.text
    for key, value in attention_parameters(config).items():
        assert f"| `{key}` | {value} |" in card.text


@pytest.mark.parametrize("fields,block", [
    ({}, "x = x + Attn(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x))`, a final RMSNorm"),
    ({"norm_type": "layernorm", "mlp_type": "plain", "hidden_act": "gelu"},
     "x = x + Attn(LayerNorm(x)); x = x + MLP[gelu](LayerNorm(x))`, a final LayerNorm"),
    ({"hidden_act": "gelu"}, "x = x + Attn(RMSNorm(x)); x = x + GatedMLP[gelu](RMSNorm(x))`"),
])
def test_card_describes_the_block_the_config_builds(tmp_path, fields, block):
    HfAttnForCausalLM(tiny_config("eager", **fields)).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert block in card
    assert "intermediate_size (" + block.split("x = x + ")[2].split("(")[0] + ")" in card


def test_card_without_eval_results_or_data_says_so(tmp_path):
    config = tiny_config("rope", "rope", architectures=["HfAttnForCausalLM"],
                         rope_scaling={"type": "linear", "factor": 2.0})
    card = ModelCard.load(write_model_card(tmp_path, config))
    assert card.data.eval_results is None
    assert "No evaluation results were recorded" in card.text and "was not recorded" in card.text
    assert card.data.to_dict()["hf_attn"]["rope_scaling"] == {"type": "linear", "factor": 2.0}
    assert "linear scaling x2.0" in card.text


@pytest.mark.parametrize(
    "data, field",
    [
        ({"eval_result": {"accuracy": 1.0}}, "unknown key"),
        ({"eval_results": {"accuracy": "high"}}, "eval_results"),
        ({"eval_results": {"accuracy": float("nan")}}, "eval_results"),
        ({"eval_results": [0.5]}, "eval_results"),
        ("datasets", "model_card_data"),
    ],
)
def test_bad_model_card_data_raises_value_error(tmp_path, data, field):
    with pytest.raises(ValueError, match=field):
        write_model_card(tmp_path, tiny_config(), data)
    assert not (tmp_path / "README.md").exists()


def test_allowed_keys_are_documented():
    assert all(isinstance(v, str) and v for v in MODEL_CARD_DATA_KEYS.values())


def test_copied_module_without_template_writes_nothing(tmp_path):
    """As remote code (the .py copied alone into a checkpoint) there is no template: None, no file, no error."""
    copy = tmp_path / "code" / "modelcard_hf_attn.py"
    copy.parent.mkdir()
    shutil.copy(PACKAGE_DIR / "modelcard_hf_attn.py", copy)
    spec = importlib.util.spec_from_file_location("copied_modelcard_hf_attn", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "ckpt"
    out.mkdir()
    assert module.write_model_card(out, tiny_config(architectures=["HfAttnForCausalLM"])) is None
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("model_class", [HfAttnForCausalLM, HfAttnForSequenceClassification])
def test_save_pretrained_writes_the_card(tmp_path, model_class):
    model = model_class(tiny_config(num_labels=2))
    model.model_card_data = {"eval_results": {"accuracy": 0.625}, "datasets": ["user/data"]}
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.eval_results[0].metric_value == 0.625
    assert card.data.pipeline_tag == ARCHITECTURES[model_class.__name__]


@pytest.mark.parametrize("module", ["modelcard_hf_attn.py", "hub_hf_attn.py"])
def test_remote_code_modules_import_only_what_a_checkpoint_has(module):
    """Copied into checkpoints: stdlib, huggingface_hub, transformers and flat siblings only."""
    source = (PACKAGE_DIR / module).read_text(encoding="utf-8")
    allowed = set(sys.stdlib_module_names) | {"huggingface_hub", "transformers", "__future__"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            assert {a.name.split(".")[0] for a in node.names} <= allowed, ast.unparse(node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: must be a flat sibling that exists
                assert node.level == 1 and node.module and (PACKAGE_DIR / f"{node.module}.py").is_file()
            else:
                assert node.module.split(".")[0] in allowed, ast.unparse(node)
    # transformers' copier reads import-looking text even in docstrings; only real flat imports may match
    copier = re.findall(r"^\s*from\s+\.(\S+)\s+import", source, flags=re.MULTILINE)
    assert all((PACKAGE_DIR / f"{name}.py").is_file() for name in copier)


# ---- what a published card may say (issue 14, item 11) ------------------------------------------


def test_card_of_an_atomic_save_names_the_final_folder_without_local_paths(tmp_path):
    """What the training quickstart publishes: save_pretrained inside publish_folder_atomically's
    temporary folder, with the corpus described by describe_corpus (which names the stdlib's absolute path)."""
    from accelerate import Accelerator

    corpus = describe_corpus(DataConfig())
    assert str(stdlib_root()) in corpus  # the leak this test guards against is real
    model = HfAttnForCausalLM(tiny_config(architectures=["HfAttnForCausalLM"]))
    model.model_card_data = {
        "eval_results": {"perplexity": 93.3}, "eval_dataset_name": corpus, "eval_split": "validation",
        "training_data": f"Trained from scratch on {corpus}.",
    }
    final = publish_folder_atomically(Accelerator(cpu=True), tmp_path / "run" / "final", model.save_pretrained)
    readme = (final / "README.md").read_text(encoding="utf-8")
    card = ModelCard(readme)
    assert card.data.model_name == "final" and readme.count("# final\n") == 1
    assert 'from_pretrained("final"' in readme and ".tmp-" not in readme
    assert card.data.eval_results[0].dataset_name == "python-stdlib"
    assert "Trained from scratch on python-stdlib." in readme
    assert str(stdlib_root()) not in readme and str(tmp_path) not in readme


def test_card_strips_absolute_paths_from_every_data_field(tmp_path):
    home = "/home/someone/projects"
    data = {
        "datasets": [f"{home}/data/train.jsonl", "user/hub-data"],
        "eval_dataset": f"{home}/data/valid.jsonl",
        "eval_dataset_name": f"local files ['{home}/data/valid.jsonl']",
        "eval_results": {"accuracy": 0.5},
        "base_model": f"{home}/runs/pretrained",
        "training_data": f"Files under `{home}/data` (see https://huggingface.co/datasets/user/hub-data).",
        "intended_use": "Tests from ~/work/x.",
    }
    readme = write_model_card(tmp_path / "ckpt", tiny_config(), data).read_text(encoding="utf-8")
    card = ModelCard(readme)
    assert "/home/" not in readme and "~/" not in readme
    assert card.data.datasets == ["train.jsonl", "user/hub-data"]
    assert card.data.eval_results[0].dataset_type == "valid.jsonl"
    assert card.data.eval_results[0].dataset_name == "local files ['valid.jsonl']"
    assert card.data.base_model is None  # a local folder is no Hub reference
    assert "Files under `data` (see https://huggingface.co/datasets/user/hub-data)." in readme


@pytest.mark.parametrize(
    "text, expected",
    [
        ("python-stdlib (/usr/lib/python3.11)", "python-stdlib"),
        ("local files ['/srv/a/train.txt', 'b.txt']", "local files ['train.txt', 'b.txt']"),
        ("~/data/x.txt and ~bob/y.txt", "x.txt and y.txt"),
        ("C:\\Users\\me\\data.csv", "data.csv"),
        ("file:///home/me/a.txt", "a.txt"),
        # left alone: URLs, Hub ids, relative paths, fractions, a lone slash
        ("https://huggingface.co/datasets/user/data", "https://huggingface.co/datasets/user/data"),
        ("user/data, runs/tiny, 1/2 and/or a / b", "user/data, runs/tiny, 1/2 and/or a / b"),
    ],
)
def test_strip_local_paths(text, expected):
    assert strip_local_paths(text) == expected


def test_folder_name_without_temporary_prefix(tmp_path):
    card = ModelCard.load(write_model_card(_mkdir(tmp_path / ".tmp-my-model"), tiny_config()))
    assert card.data.model_name == "my-model"
    # an explicit model_name still wins
    card = ModelCard.load(write_model_card(_mkdir(tmp_path / ".tmp-x"), tiny_config(), {"model_name": "given"}))
    assert card.data.model_name == "given"


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path
