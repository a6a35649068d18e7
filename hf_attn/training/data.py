"""Text corpora for language-model training: load, split, tokenise once (cached), pack into blocks.

Every source goes through ``datasets.load_dataset``, so local files and Hub datasets share one path:

- ``stdlib`` (default, embedded): every ``*.py`` file of this interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``, ``site-packages`` excluded), sorted, one document per file,
  loaded with the ``text`` builder. It is real text that every machine with Python has, so training
  works with no download. CPython 3.11 ships ~1,800 files, ~31 MB.
- ``files``: local text files / folders / globs (``data.data_files``), one document per file.
- anything else: ``load_dataset(data.dataset, data.dataset_config)``, a Hub name or a local folder.

For ``stdlib`` and ``files`` the validation split is chosen by hashing each file's path relative to
the corpus root, so it is the same on every machine and does not move when files are added. Other
datasets use their own validation split, or a seeded ``train_test_split`` of the training split.

Tokenised and packed datasets are written by ``Dataset.map`` as cache files, fingerprinted by the
raw data, the tokenizer and the block size, so a second run (or the other processes of a
distributed run) load them instead of tokenising again.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset
from torch.utils.data import Sampler
from transformers import PreTrainedTokenizerBase

from hf_attn.training.config import FILES_DATASET, STDLIB_DATASET, DataConfig

_EXCLUDED_STDLIB_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_root() -> Path:
    """Folder of this interpreter's standard library (the embedded corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: str | Path | None = None) -> list[Path]:
    """All ``*.py`` files under the standard library, sorted, third-party packages excluded."""
    root = Path(root) if root is not None else stdlib_root()
    return sorted(
        path
        for path in root.rglob("*.py")
        if path.is_file() and not any(part in _EXCLUDED_STDLIB_DIRS for part in path.relative_to(root).parts)
    )


def expand_data_files(patterns: str | Sequence[str]) -> list[Path]:
    """Expand files, folders (every file below, recursively) and glob patterns; sorted, deduplicated.

    Raises:
        ValueError: if a pattern matches nothing, or nothing is left at all.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    found: set[Path] = set()
    for pattern in patterns:
        matches = [Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)]
        if not matches:
            raise ValueError(f"config key data.data_files: {pattern!r} matches no file")
        for match in matches:
            if match.is_dir():
                found.update(p for p in match.rglob("*") if p.is_file() and not p.name.startswith("."))
            elif match.is_file():
                found.add(match)
    if not found:
        raise ValueError(f"config key data.data_files={patterns!r} is invalid: no files found")
    return sorted(p.resolve() for p in found)


def path_bucket(relative_path: str) -> float:
    """Deterministic pseudo-random number in [0, 1) from a relative path (posix separators)."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_files_by_hash(
    files: Sequence[Path], root: Path, validation_fraction: float
) -> tuple[list[str], list[str]]:
    """Split files into (train, validation) by the hash of their path relative to ``root``.

    A file is in validation when ``path_bucket(relative path) < validation_fraction``; whole files
    go to one side, so no document is split across train and validation.

    Raises:
        ValueError: if either side would be empty.
    """
    train, validation = [], []
    for path in files:
        relative = path.relative_to(root).as_posix()
        (validation if path_bucket(relative) < validation_fraction else train).append(str(path))
    if not train or not validation:
        raise ValueError(
            f"config key data.validation_fraction={validation_fraction} is invalid for this corpus: it puts "
            f"{len(validation)} of {len(files)} files in validation and {len(train)} in train; "
            "both sides need at least one file (use more files or another fraction)"
        )
    return train, validation


def _load_text_files(train: list[str], validation: list[str], cache_dir: str | None) -> DatasetDict:
    # One row per file. Some stdlib test files are deliberately not valid UTF-8: replace, don't fail.
    return load_dataset(
        "text",
        data_files={"train": train, "validation": validation},
        sample_by="document",
        encoding_errors="replace",
        cache_dir=cache_dir,
    )


def load_raw_datasets(data: DataConfig, seed: int = 0) -> DatasetDict:
    """Load the corpus named by ``data`` as a ``DatasetDict`` with ``train`` and ``validation`` splits.

    Raises:
        ValueError: for missing files/splits/columns, naming the config key.
    """
    if data.dataset == STDLIB_DATASET:
        root = stdlib_root()
        train, validation = split_files_by_hash(stdlib_source_files(root), root, data.validation_fraction)
        return _load_text_files(train, validation, data.cache_dir)
    if data.dataset == FILES_DATASET:
        files = expand_data_files(data.data_files)
        root = Path(os.path.commonpath([str(f.parent) for f in files]))
        train, validation = split_files_by_hash(files, root, data.validation_fraction)
        return _load_text_files(train, validation, data.cache_dir)

    loaded = load_dataset(data.dataset, data.dataset_config, cache_dir=data.cache_dir)
    if not isinstance(loaded, DatasetDict):
        raise ValueError(
            f"config key data.dataset={data.dataset!r} is invalid: expected a dataset with named splits"
        )
    if data.train_split not in loaded:
        raise ValueError(
            f"config key data.train_split={data.train_split!r} is invalid: allowed values are {list(loaded)}"
        )
    if data.validation_split is not None and data.validation_split in loaded:
        raw = DatasetDict({"train": loaded[data.train_split], "validation": loaded[data.validation_split]})
    else:
        parts = loaded[data.train_split].train_test_split(test_size=data.validation_fraction, seed=seed)
        raw = DatasetDict({"train": parts["train"], "validation": parts["test"]})
    columns = raw["train"].column_names
    if data.text_column not in columns:
        raise ValueError(
            f"config key data.text_column={data.text_column!r} is invalid: allowed values are {columns}"
        )
    return raw


def describe_corpus(data: DataConfig) -> str:
    """A short human-readable name of the corpus, for logs and the model card."""
    if data.dataset == STDLIB_DATASET:
        return f"python-stdlib ({stdlib_root()})"
    if data.dataset == FILES_DATASET:
        return f"local files {data.data_files}"
    return data.dataset if data.dataset_config is None else f"{data.dataset}/{data.dataset_config}"


def iter_texts(dataset: Dataset, column: str = "text", batch_size: int = 1000) -> Iterator[str]:
    """Stream one column of a dataset (for tokenizer training without holding it all in memory)."""
    for batch in dataset.iter(batch_size=batch_size):
        yield from batch[column]


def _tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{tokenizer.eos_token_id}|{state}".encode()).hexdigest()


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def tokenize_and_pack(
    raw: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    text_column: str = "text",
    num_proc: int | None = None,
) -> DatasetDict:
    """Tokenise every document, end each with ``eos``, concatenate and cut into ``block_size`` blocks.

    Returns a ``DatasetDict`` whose splits have one column ``input_ids`` (lists of ``block_size``
    ints), in torch format. The tail of each map batch shorter than a block is dropped (at most
    ``block_size - 1`` tokens per 1,000 documents).

    Raises:
        ValueError: if a split yields no complete block.
    """
    eos = tokenizer.eos_token_id
    token_digest = _tokenizer_digest(tokenizer)

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        # verbose=False: documents are longer than model_max_length on purpose, they get packed.
        ids = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    def pack(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        flat = list(chain.from_iterable(batch["input_ids"]))
        usable = len(flat) // block_size * block_size
        return {"input_ids": [flat[i : i + block_size] for i in range(0, usable, block_size)]}

    packed = {}
    for split, dataset in raw.items():
        # Fingerprints are explicit: hashing the closures would pickle the tokenizer, whose hash is
        # not stable across processes. The parent fingerprint identifies the raw data.
        parent = dataset._fingerprint  # no public accessor exists
        tokenized = dataset.map(
            tokenize,
            batched=True,
            remove_columns=dataset.column_names,
            num_proc=num_proc,
            new_fingerprint=_fingerprint(parent, "tokenize", token_digest, text_column),
            desc=f"tokenize {split}",
        )
        blocks = tokenized.map(
            pack,
            batched=True,
            num_proc=num_proc,
            new_fingerprint=_fingerprint(parent, "pack", token_digest, text_column, str(block_size)),
            desc=f"pack {split} into blocks of {block_size}",
        )
        if len(blocks) == 0:
            raise ValueError(
                f"config key data.block_size={block_size} is invalid for this corpus: the {split!r} split has "
                f"fewer than {block_size} tokens"
            )
        packed[split] = blocks.with_format("torch", columns=["input_ids"])
    return DatasetDict(packed)


class StepBatchSampler(Sampler[list[int]]):
    """Yields this process's micro-batches of block indices for optimizer steps ``start_step..max_steps-1``.

    The data order is a function of the optimizer step only, not of the process count: each epoch
    is a seeded permutation of all blocks, optimizer step ``s`` consumes positions
    ``[s * G, (s + 1) * G)`` of it (``G`` = global batch = batch_size x processes x accumulation),
    and within a step micro-batch ``m`` of process ``p`` is the slice starting at
    ``(m * processes + p) * batch_size``. Hence one process with batch 8 and two processes with
    batch 4 see the same blocks per step, and resuming at step ``s`` needs no replay of the
    skipped batches. An incomplete last global batch of an epoch is dropped.
    """

    def __init__(
        self,
        num_examples: int,
        *,
        batch_size: int,
        num_processes: int = 1,
        process_index: int = 0,
        accumulation_steps: int = 1,
        seed: int = 0,
        start_step: int = 0,
        max_steps: int,
    ) -> None:
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.accumulation_steps = accumulation_steps
        self.seed = seed
        self.start_step = start_step
        self.max_steps = max_steps
        self.num_examples = num_examples
        self.global_batch_size = batch_size * num_processes * accumulation_steps
        if num_examples < self.global_batch_size:
            raise ValueError(
                f"the training split has {num_examples} blocks, fewer than one global batch of "
                f"{self.global_batch_size} (training.per_device_batch_size={batch_size} x {num_processes} processes "
                f"x training.gradient_accumulation_steps={accumulation_steps}); lower them or data.block_size"
            )
        self.steps_per_epoch = num_examples // self.global_batch_size
        self._epoch = -1
        self._permutation = np.arange(0)

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            self._epoch = epoch
        return self._permutation

    def indices(self, step: int, micro_step: int) -> list[int]:
        """Block indices of micro-batch ``micro_step`` of optimizer step ``step`` on this process."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        start = (
            offset * self.global_batch_size
            + (micro_step * self.num_processes + self.process_index) * self.batch_size
        )
        return self._epoch_permutation(epoch)[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.max_steps):
            for micro_step in range(self.accumulation_steps):
                yield self.indices(step, micro_step)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.accumulation_steps


__all__ = [
    "stdlib_root",
    "stdlib_source_files",
    "expand_data_files",
    "path_bucket",
    "split_files_by_hash",
    "load_raw_datasets",
    "describe_corpus",
    "iter_texts",
    "tokenize_and_pack",
    "StepBatchSampler",
]
