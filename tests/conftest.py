"""Shared tiny configurations: every test model has a few thousand parameters and runs in milliseconds."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

import hf_attn  # noqa: F401  (registers the Auto classes)
from hf_attn import HfAttnConfig
from hf_attn.modeling_hf_attn import CACHE_KWARG

# The cache's keyword and output field in the installed transformers ("cache" from 5.24,
# "past_key_values" before): tests pass and read it under that name, so they run on both.
CACHE = CACHE_KWARG


def cache_of(output):
    """The cache a forward returned."""
    return getattr(output, CACHE)


def with_cache(cache) -> dict:
    """Keyword arguments passing ``cache`` to a forward."""
    return {CACHE: cache}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

# (attention_mode, position_embedding_type): the four modes plus rope combined with local and lowrank.
MODE_VARIANTS = [
    ("eager", "absolute"),
    ("local", "absolute"),
    ("lowrank", "absolute"),
    ("rope", "rope"),
    ("local", "rope"),
    ("lowrank", "rope"),
]
MODE_IDS = [f"{m}-{p}" for m, p in MODE_VARIANTS]


def tiny_config(attention_mode: str = "eager", position_embedding_type: str | None = None, **overrides) -> HfAttnConfig:
    """A 2-layer, 32-wide config with grouped-query attention and small windows/ranks."""
    kwargs = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        sliding_window=4,
        lowrank_dim=8,
        lowrank_chunk_size=4,
        attention_mode=attention_mode,
        position_embedding_type=position_embedding_type,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return HfAttnConfig(**kwargs)


@pytest.fixture(params=MODE_VARIANTS, ids=MODE_IDS)
def mode_variant(request) -> tuple[str, str]:
    return request.param


class KernelSpy:
    """Stands in for the compiled kernel module and records the name of every kernel called."""

    def __init__(self, module) -> None:
        self.module, self.calls = module, []

    def __getattr__(self, name: str):
        kernel = getattr(self.module, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            return kernel(*args, **kwargs)

        return call


def node_name(tensor: torch.Tensor) -> str:
    """The autograd node that made ``tensor``: a Python function's backward (``_RMSNormBackward``) or
    a C++ node by its struct name (``RMSNormNode`` for ``torch::autograd::CppNode<...::RMSNormNode>``)."""
    return tensor.grad_fn.name().rsplit("::", 1)[-1].rstrip(">")


@pytest.fixture(params=[True, False], ids=["kernels", "torch-ops"])
def cpu_kernels(request, monkeypatch) -> SimpleNamespace:
    """Runs a test with the fused CPU kernels (``HF_ATTN_CPU_KERNELS=1``: built once, then cached;
    ``.calls`` lists the kernels called) and with the PyTorch ops (``0``). ``.on`` says which."""
    from hf_attn import cpu_kernels as module

    monkeypatch.setenv("HF_ATTN_CPU_KERNELS", "1" if request.param else "0")
    calls: list[str] = []
    if request.param:
        spy = KernelSpy(module.kernels())
        monkeypatch.setitem(module._state, "module", spy)
        calls = spy.calls
    return SimpleNamespace(on=request.param, calls=calls)
