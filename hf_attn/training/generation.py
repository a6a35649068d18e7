"""Load a saved hf_attn model through the Auto classes and sample text from it."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import hf_attn  # noqa: F401  (registers model_type "hf_attn" with the Auto classes)


def load_model_and_tokenizer(
    path: str, *, device: str | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a ``save_pretrained`` folder or Hub id, in eval mode."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, tokenizer


def generate_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int | None = 0,
) -> str:
    """Sample a continuation of ``prompt`` (returned with the prompt). ``temperature=0`` is greedy.

    Raises:
        ValueError: for ``max_new_tokens < 1``, ``temperature < 0`` or ``top_k < 1``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: expected an integer >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is invalid: expected a number >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid: expected an integer >= 1 or None")
    if seed is not None:
        torch.manual_seed(seed)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:  # an empty prompt starts from the document separator
        ids = torch.tensor([[tokenizer.bos_token_id]])
    ids = ids.to(model.device)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": top_k}
        if temperature > 0
        else {"do_sample": False}
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    return tokenizer.decode(out[0], skip_special_tokens=True)


__all__ = ["load_model_and_tokenizer", "generate_text"]
