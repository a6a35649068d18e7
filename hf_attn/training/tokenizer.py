"""Byte-level BPE tokenizers for hf_attn: train one from text, or load an existing one.

A byte-level BPE (GPT-2 style) never produces an unknown token: every string is first mapped to its
UTF-8 bytes, and merges are learned on top of the 256 byte symbols. That matters here because the
default corpus is Python source, where indentation, operators and non-ASCII literals must all
round-trip exactly (``decode(encode(text)) == text``).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# One token marks document boundaries (eos, and bos for generation); a separate pad token keeps
# padding distinguishable from a real end of text when the fine-tune workstream batches examples.
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_BYTE_ALPHABET_SIZE = 256


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    eos_token: str = EOS_TOKEN,
    pad_token: str = PAD_TOKEN,
    model_max_length: int | None = None,
    length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: The training documents (any iterable of strings; consumed once).
        vocab_size: Size of the final vocabulary, including the 256 byte symbols and the special
            tokens. Must be > 256 + number of special tokens.
        min_frequency: A pair must occur at least this often to be merged.
        eos_token: End-of-text token; also used as ``bos_token`` (generation prompt start).
        pad_token: Padding token.
        model_max_length: Stored in the tokenizer config (the model's context length), or ``None``.
        length: Number of texts, only used for the progress estimate; optional.

    Returns:
        A tokenizer whose ``save_pretrained`` writes ``tokenizer.json`` + ``tokenizer_config.json``
        that ``AutoTokenizer.from_pretrained`` reloads.

    Raises:
        ValueError: if ``vocab_size`` or ``min_frequency`` is out of range, or the special tokens
            are empty or equal.
    """
    special_tokens = [eos_token, pad_token]
    minimum = _BYTE_ALPHABET_SIZE + len(special_tokens) + 1
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size!r} is invalid: expected an integer >= {minimum} "
            f"(256 byte symbols + {len(special_tokens)} special tokens + at least one merge)"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency!r} is invalid: expected an integer >= 1")
    if not eos_token or not pad_token or eos_token == pad_token:
        raise ValueError(
            f"eos_token={eos_token!r}, pad_token={pad_token!r} are invalid: expected two different non-empty strings"
        )

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        # Seed all 256 bytes so that text unseen in training still encodes (no unknown token).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=eos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        **kwargs,
    )


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Load an existing tokenizer (local folder or Hub name) and make sure it can pad and end text.

    Raises:
        ValueError: if the tokenizer has no ``eos_token``; packing documents needs a separator.
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer.path={path!r} is invalid: the tokenizer has no eos_token to separate documents"
        )
    if tokenizer.pad_token_id is None:
        # Padding is only used for evaluation batches and generation; eos is the usual stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


__all__ = ["EOS_TOKEN", "PAD_TOKEN", "train_bpe_tokenizer", "load_tokenizer"]
