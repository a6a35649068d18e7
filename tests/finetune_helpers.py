"""Shared pieces of test_finetune.py, test_hub.py and test_modelcard.py.

The tiny "pretrained" checkpoint is built once per pytest process (functools.cache) and removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub.hf_api
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from transformers import TrainingArguments
from transformers.dynamic_module_utils import get_relative_import_files

import hf_attn
from hf_attn.finetune.tiny import build_tiny_checkpoint

# Small stdlib packages keep tokenizer training fast; disjoint from the classification packages.
PRETRAIN_PACKAGES = ("json", "logging", "http", "urllib")
PACKAGE_DIR = Path(hf_attn.__file__).parent


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: on a shared 2-core machine, two threads contending for cores run these tiny
    models several times slower than one. Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.cache
def pretrained_checkpoint() -> Path:
    """A 2-layer, 32-wide causal LM + 320-token BPE, trained 30 AdamW steps on stdlib text."""
    root = Path(tempfile.mkdtemp(prefix="hf_attn_tiny_"))
    atexit.register(shutil.rmtree, root, True)
    return build_tiny_checkpoint(
        root / "pretrained",
        packages=PRETRAIN_PACKAGES,
        vocab_size=320,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        train_steps=30,
        seq_len=64,
        batch_size=8,
    )


def training_args(output_dir: str | Path, **overrides: Any) -> TrainingArguments:
    """Quiet CPU TrainingArguments; evaluation in one batch so losses can be recomputed exactly."""
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=512,
        learning_rate=3e-3,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        save_strategy="no",
        logging_steps=1000,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def expected_code_files() -> set[str]:
    """The .py files remote code needs, by transformers' own copier logic (an independent oracle)."""
    roots = [PACKAGE_DIR / "modeling_hf_attn.py", PACKAGE_DIR / "configuration_hf_attn.py"]
    files = {p.name for p in roots}
    for root in roots:
        files |= {Path(f).name for f in get_relative_import_files(str(root))}
    return files


@dataclass
class HubRecorder:
    """Stands in for the Hub: records create_repo / create_branch / create_commit calls and their files.

    Every upload route ends in ``HfApi.create_commit``: hf_attn's ``upload_checkpoint`` calls it, and
    so does ``HfApi.upload_folder`` (Trainer's route), after a metadata check stubbed here too."""

    repos: list[dict[str, Any]] = field(default_factory=list)
    branches: list[dict[str, Any]] = field(default_factory=list)
    commits: list[dict[str, Any]] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> HubRecorder:
        recorder = self

        def create_repo(api, repo_id, **kwargs):
            recorder.repos.append({"repo_id": repo_id, **kwargs})
            full = repo_id if "/" in repo_id else f"test-user/{repo_id}"
            return RepoUrl(f"https://huggingface.co/{full}")

        def create_branch(api, repo_id, **kwargs):
            recorder.branches.append({"repo_id": repo_id, **kwargs})

        def create_commit(api, repo_id, operations, **kwargs):
            files = {}
            for op in operations:
                # read now: model.push_to_hub uploads from a temporary folder deleted right after
                with op.as_file() as f:
                    files[op.path_in_repo] = f.read()
            recorder.commits.append({"repo_id": repo_id, "files": files, **kwargs})
            return CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
                commit_message=kwargs.get("commit_message", ""),
                commit_description="",
                oid="0" * 40,
            )

        def validate_yaml(api, content, **kwargs):
            # HfApi.upload_folder (Trainer's route) asks the Hub to validate README.md's metadata first
            ModelCard(content)

        def no_network(*args, **kwargs):
            raise RuntimeError(f"test tried to open a network connection: {args}")

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "_validate_yaml", validate_yaml)
        # With hf_xet installed, upload_folder streams through its own pipeline; without, it ends in
        # create_commit like every other route, so one recorder sees all of them.
        monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
        # Anything else that would reach the Hub fails loudly instead of silently passing.
        monkeypatch.setattr(socket.socket, "connect", no_network)
        return self


def write_files(files: dict[str, bytes], folder: Path) -> Path:
    """Materialise captured commit files as a folder (what a clone of the Hub repo would hold)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder
