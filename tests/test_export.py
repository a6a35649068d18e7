"""torch.export and ONNX: the causal-LM forward (input_ids [, attention_mask] -> logits, no cache)
exports in every mode, with a fixed or a dynamic sequence length, and the exported program (and the
ONNX model under onnxruntime) computes the eager logits."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import nn

from hf_attn import HfAttnForCausalLM

MODES = ["eager", "rope", "local", "lowrank"]


class LogitsOnly(nn.Module):
    """What gets exported: a plain tensor-in, tensor-out forward (no cache, no ModelOutput)."""

    def __init__(self, model: HfAttnForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def make_lm(mode: str) -> HfAttnForCausalLM:
    torch.manual_seed(0)
    return HfAttnForCausalLM(tiny_config(mode)).eval()


def ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(length))


def left_padded_mask(batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :3] = 0
    return mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_exported_forward_equals_eager(mode, dynamic):
    """input_ids -> logits; a dynamic length (torch.export.Dim) serves lengths other than the example's."""
    model = make_lm(mode)
    shapes = {"input_ids": {1: torch.export.Dim("seq", min=1, max=128)}} if dynamic else None
    program = torch.export.export(LogitsOnly(model), (ids(2, 16),), dynamic_shapes=shapes)
    with torch.no_grad():
        for length in (16, 7, 37, 1) if dynamic else (16,):
            x = ids(2, length)
            torch.testing.assert_close(program.module()(x), model(x, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_exported_dynamic_ntk_rope_serves_lengths_on_both_sides_of_the_trained_length():
    """Dynamic NTK scales by the (symbolic) sequence length inside the graph: one exported program
    is plain rope up to max_position_embeddings=128 and stretched beyond it, as eager."""
    torch.manual_seed(0)
    model = HfAttnForCausalLM(tiny_config("rope", rope_scaling={"type": "dynamic", "factor": 2.0})).eval()
    shapes = {"input_ids": {1: torch.export.Dim("seq", min=2, max=512)}}
    program = torch.export.export(LogitsOnly(model), (ids(1, 16),), dynamic_shapes=shapes)
    with torch.no_grad():
        for length in (16, 200):
            x = ids(1, length)
            torch.testing.assert_close(program.module()(x), model(x, use_cache=False).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_exported_forward_with_padding_mask_and_dynamic_length(mode):
    """A left-padded batch: the mask (and the positions counted from it) are graph inputs too."""
    model = make_lm(mode)
    seq = torch.export.Dim("seq", min=4, max=128)
    program = torch.export.export(LogitsOnly(model), (ids(2, 16), left_padded_mask(2, 16)),
                                  dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}})
    with torch.no_grad():
        for length in (16, 9):
            x, mask = ids(2, length), left_padded_mask(2, length)
            expected = model(x, attention_mask=mask, use_cache=False).logits
            torch.testing.assert_close(program.module()(x, mask), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_onnx_logits_equal_pytorch(mode, tmp_path):
    """``torch.onnx.export(..., dynamo=True)`` with dynamic batch and length; onnxruntime's logits
    equal PyTorch's within 1e-4."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = make_lm(mode)
    path = tmp_path / f"{mode}.onnx"
    program = torch.onnx.export(LogitsOnly(model), (ids(2, 16),), dynamo=True, input_names=["input_ids"],
                                output_names=["logits"], dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}})
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for batch, length in ((2, 16), (3, 9)):
            x = ids(batch, length)
            (got,) = session.run(None, {"input_ids": x.numpy()})
            torch.testing.assert_close(torch.from_numpy(got), model(x, use_cache=False).logits, rtol=1e-4, atol=1e-4)
