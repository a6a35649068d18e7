"""Create a tiny, randomly initialised hf_attn causal LM + BPE tokenizer to pre-train and fine-tune.

Used by the tests (as the "pretrained" checkpoint after a few optimisation steps) and by the
end-to-end example in docs/finetune.md (as the starting point of pre-training with
``scripts/finetune.py --task causal_lm``). The tokenizer is learned from the same stdlib text the
model is trained on.

    python -m hf_attn.finetune.tiny --output_dir runs/tiny-init --packages idlelib,tkinter,unittest
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from ..configuration_hf_attn import HfAttnConfig
from ..modeling_hf_attn import HfAttnForCausalLM
from ..training.tokenizer import train_bpe_tokenizer
from .data import build_stdlib_dataset

# Disjoint from the classification task's packages (asyncio, email, multiprocessing, xml), so text of
# the classification test split is never seen in pre-training, not even without its label.
PRETRAIN_PACKAGES = ("idlelib", "tkinter", "unittest", "importlib", "logging", "http", "urllib", "concurrent", "json")


def build_tiny_checkpoint(
    output_dir: str | Path,
    *,
    packages: Sequence[str] = PRETRAIN_PACKAGES,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    attention_mode: str = "eager",
    max_position_embeddings: int = 256,
    train_steps: int = 0,
    seq_len: int = 64,
    batch_size: int = 8,
    learning_rate: float = 3e-3,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Train a tokenizer on the train split of ``packages``, build a random model, optionally train it.

    Args:
        output_dir: Folder to write (model + tokenizer, loadable with the Auto classes).
        packages: Stdlib packages whose functions form the text.
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, attention_mode,
            max_position_embeddings: Model/tokenizer sizes (``config_overrides`` reach HfAttnConfig too).
        train_steps: Plain AdamW steps of next-token prediction on packed ``seq_len`` blocks (0: none).
            A few steps give the tests a checkpoint that is "pretrained" but still improvable.
        seq_len, batch_size, learning_rate: Settings of those steps.
        seed: Seeds the weights and the order of the blocks.

    Returns:
        ``Path(output_dir)``.

    Raises:
        ValueError: on bad sizes (from HfAttnConfig / the tokenizer trainer) or seq_len too long.
    """
    if seq_len > max_position_embeddings:
        raise ValueError(f"seq_len: {seq_len} exceeds max_position_embeddings={max_position_embeddings}")
    texts = list(build_stdlib_dataset(packages)["train"]["text"])
    tokenizer = train_bpe_tokenizer(texts, vocab_size, model_max_length=max_position_embeddings)
    torch.manual_seed(seed)
    config = HfAttnConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        attention_mode=attention_mode,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_overrides,
    )
    model = HfAttnForCausalLM(config)
    if train_steps > 0:
        ids = [t for ids in tokenizer(texts)["input_ids"] for t in ids + [tokenizer.eos_token_id]]
        blocks = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)  # (N, seq_len)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
        model.train()
        for _ in range(train_steps):
            batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: ``python -m hf_attn.finetune.tiny --output_dir DIR [--packages a,b] [sizes]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--packages", default=",".join(PRETRAIN_PACKAGES), help="comma-separated stdlib packages")
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_hidden_layers", type=int, default=2)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--attention_mode", default="eager")
    parser.add_argument("--max_position_embeddings", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_checkpoint(
        args.output_dir,
        packages=[p for p in args.packages.split(",") if p],
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        attention_mode=args.attention_mode,
        max_position_embeddings=args.max_position_embeddings,
        seed=args.seed,
    )
    print(path)
    return path


if __name__ == "__main__":
    main()
