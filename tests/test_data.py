"""Tests of hf_attn.training.data and hf_attn.training.tokenizer: corpus, split, packing, order."""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from hf_attn.training.config import DataConfig
from hf_attn.training.data import (
    StepBatchSampler,
    iter_texts,
    load_raw_datasets,
    path_bucket,
    split_files_by_hash,
    stdlib_root,
    stdlib_source_files,
    tokenize_and_pack,
)
from hf_attn.training.tokenizer import EOS_TOKEN, PAD_TOKEN, train_bpe_tokenizer

# Small real stdlib modules: a realistic corpus that tokenises in milliseconds.
_SAMPLE_MODULES = ["bisect.py", "colorsys.py", "keyword.py", "fnmatch.py", "glob.py", "heapq.py", "shlex.py"]


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keep the user's ~/.cache/huggingface/datasets free of test corpora.
    monkeypatch.setattr(
        datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "datasets_cache"
    )


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name in _SAMPLE_MODULES:
        (folder / name).write_text((stdlib_root() / name).read_text(encoding="utf-8"), encoding="utf-8")
    # Non-ASCII text must survive loading and tokenisation.
    (folder / "unicode_doc.txt").write_text("naïve café — ünïcödé ✓ 中文\n" * 20, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tokenizer(corpus_dir: Path):
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus_dir.iterdir())]
    return train_bpe_tokenizer(texts, vocab_size=400)


def test_stdlib_files_are_sorted_python_sources_without_third_party_packages():
    files = stdlib_source_files()
    assert len(files) > 500  # CPython ships well over a thousand modules and tests
    assert files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert stdlib_root() / "json" / "decoder.py" in files


def test_hash_split_is_deterministic_disjoint_and_stable_when_files_are_added(tmp_path: Path):
    root = tmp_path
    files = [root / f"pkg{i % 7}" / f"mod{i}.py" for i in range(400)]
    train, validation = split_files_by_hash(files, root, 0.1)
    assert set(train).isdisjoint(validation)
    assert sorted(train + validation) == sorted(str(f) for f in files)
    assert 20 <= len(validation) <= 60  # ~10% of 400, hash-uniform
    # Each file's side depends on its own path only: adding files moves nobody.
    more = files + [root / "new" / f"extra{i}.py" for i in range(100)]
    train2, validation2 = split_files_by_hash(more, root, 0.1)
    assert set(validation) <= set(validation2)
    assert set(train) <= set(train2)
    assert split_files_by_hash(files, root, 0.1) == (train, validation)
    assert 0.0 <= path_bucket("a/b.py") < 1.0


def test_hash_split_refuses_an_empty_side(tmp_path: Path):
    with pytest.raises(ValueError, match="data.validation_fraction"):
        split_files_by_hash([tmp_path / "only.py"], tmp_path, 0.01)


def test_local_files_load_one_document_per_file_with_the_hash_split(corpus_dir: Path):
    data = DataConfig(dataset="files", data_files=[str(corpus_dir)], validation_fraction=0.3)
    raw = load_raw_datasets(data)
    files = sorted(p.resolve() for p in corpus_dir.iterdir())
    train, validation = split_files_by_hash(files, corpus_dir.resolve(), 0.3)
    assert raw["train"].num_rows == len(train) and raw["validation"].num_rows == len(validation)
    contents = {p.read_text(encoding="utf-8") for p in files}
    loaded = set(raw["train"]["text"]) | set(raw["validation"]["text"])
    assert loaded == contents  # whole files, line breaks and unicode intact


def test_glob_patterns_and_missing_files(corpus_dir: Path):
    raw = load_raw_datasets(
        DataConfig(dataset="files", data_files=str(corpus_dir / "*.py"), validation_fraction=0.4)
    )
    assert raw["train"].num_rows + raw["validation"].num_rows == len(_SAMPLE_MODULES)
    with pytest.raises(ValueError, match="data.data_files"):
        load_raw_datasets(DataConfig(dataset="files", data_files=str(corpus_dir / "*.nothing")))


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"content": t, "id": i}) + "\n" for i, t in enumerate(texts)))


def test_dataset_folder_goes_through_the_hub_load_dataset_path(tmp_path: Path):
    # A local folder is resolved by load_dataset exactly like a Hub repo (split names from file names).
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [f"train text {i}" for i in range(30)])
    _write_jsonl(folder / "validation.jsonl", [f"validation text {i}" for i in range(5)])
    raw = load_raw_datasets(DataConfig(dataset=str(folder), text_column="content"))
    assert list(raw["train"]["content"]) == [f"train text {i}" for i in range(30)]
    assert raw["validation"].num_rows == 5

    with pytest.raises(
        ValueError, match=r"data.text_column='text' is invalid: allowed values are \['content', 'id'\]"
    ):
        load_raw_datasets(DataConfig(dataset=str(folder)))
    with pytest.raises(ValueError, match=r"data.train_split='training' is invalid: allowed values are"):
        load_raw_datasets(DataConfig(dataset=str(folder), train_split="training", text_column="content"))


def test_dataset_without_validation_split_is_split_with_a_seed(tmp_path: Path):
    folder = tmp_path / "train_only"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [f"doc {i}" for i in range(100)])
    data = DataConfig(dataset=str(folder), text_column="content", validation_fraction=0.1)
    first, again = load_raw_datasets(data, seed=3), load_raw_datasets(data, seed=3)
    assert first["validation"].num_rows == 10 and first["train"].num_rows == 90
    assert list(first["validation"]["content"]) == list(again["validation"]["content"])
    assert set(first["train"]["content"]).isdisjoint(first["validation"]["content"])


def test_bpe_tokenizer_round_trips_code_and_unicode_and_reloads(tokenizer, tmp_path: Path, corpus_dir: Path):
    assert len(tokenizer) == 400
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    sample = (corpus_dir / "shlex.py").read_text(encoding="utf-8")[:2000] + "\n# ünïcödé ✓ never seen: ᚠᛇᚻ\n"
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == sample  # byte-level: lossless, no unknown token
    assert len(ids) < len(sample.encode("utf-8"))  # merges were learned: fewer tokens than bytes
    tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert reloaded(sample, add_special_tokens=False)["input_ids"] == ids
    assert reloaded.eos_token_id == tokenizer.eos_token_id and reloaded.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"vocab_size": 100}, "vocab_size"), ({"vocab_size": 400, "min_frequency": 0}, "min_frequency")],
)
def test_bpe_tokenizer_rejects_bad_arguments(kwargs: dict, field: str):
    with pytest.raises(ValueError, match=field):
        train_bpe_tokenizer(["some text"], **kwargs)


class _CountingTokenizer:
    """Delegates to a tokenizer and counts encode calls (to see whether map used its cache)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tokenize_and_pack_makes_full_blocks_of_the_eos_separated_stream_and_caches(
    tokenizer, corpus_dir, tmp_path
):
    data = DataConfig(
        dataset="files",
        data_files=[str(corpus_dir)],
        validation_fraction=0.3,
        cache_dir=str(tmp_path / "cache"),
    )
    raw = load_raw_datasets(data)
    counting = _CountingTokenizer(tokenizer)
    blocks = tokenize_and_pack(raw, counting, block_size=32)
    assert counting.calls > 0
    train = blocks["train"][:]["input_ids"]  # (N, 32) torch tensor
    assert train.ndim == 2 and train.shape[1] == 32
    stream = list(
        chain.from_iterable(
            tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for t in raw["train"]["text"]
        )
    )
    assert train.shape[0] == len(stream) // 32  # one map batch here: only the final tail is dropped
    assert train.flatten().tolist() == stream[: train.numel()]

    again = _CountingTokenizer(tokenizer)
    cached = tokenize_and_pack(raw, again, block_size=32)
    assert again.calls == 0  # loaded from the datasets cache files
    assert cached["train"][:]["input_ids"].tolist() == train.tolist()
    other = _CountingTokenizer(tokenizer)
    tokenize_and_pack(raw, other, block_size=16)
    assert other.calls == 0  # tokenisation is cached separately from packing


def test_iter_texts_streams_a_column(corpus_dir: Path):
    raw = load_raw_datasets(
        DataConfig(dataset="files", data_files=[str(corpus_dir)], validation_fraction=0.3)
    )
    assert list(iter_texts(raw["train"], batch_size=2)) == list(raw["train"]["text"])


def _step_batch(sampler_kwargs: dict, step: int, processes: int, accumulation: int, batch: int) -> list[int]:
    """All block indices one optimizer step consumes, across processes and micro-steps."""
    seen = []
    for p in range(processes):
        sampler = StepBatchSampler(
            num_examples=103,
            batch_size=batch,
            num_processes=processes,
            process_index=p,
            accumulation_steps=accumulation,
            **sampler_kwargs,
        )
        for micro in range(accumulation):
            seen.extend(sampler.indices(step, micro))
    return seen


def test_step_sampler_gives_each_step_the_same_blocks_whatever_the_process_count():
    kwargs = {"seed": 5, "max_steps": 30}
    for step in (0, 1, 6, 7, 19):  # 103 // 16 = 6 steps per epoch: crosses epoch boundaries
        one = _step_batch(kwargs, step, processes=1, accumulation=1, batch=16)
        two = _step_batch(kwargs, step, processes=2, accumulation=1, batch=8)
        accumulated = _step_batch(kwargs, step, processes=2, accumulation=2, batch=4)
        assert len(one) == 16 and len(set(one)) == 16
        assert sorted(one) == sorted(two) == sorted(accumulated)


def test_step_sampler_epochs_are_permutations_and_resume_continues_the_same_stream():
    full = StepBatchSampler(103, batch_size=4, num_processes=1, seed=1, max_steps=50)
    batches = list(full)
    assert len(batches) == 50 == len(full)
    per_epoch = full.steps_per_epoch  # 25
    epoch0 = list(chain.from_iterable(batches[:per_epoch]))
    assert len(set(epoch0)) == len(epoch0) == per_epoch * 4  # no block twice within an epoch
    assert batches[:per_epoch] != batches[per_epoch:]  # each epoch is reshuffled
    resumed = StepBatchSampler(103, batch_size=4, num_processes=1, seed=1, start_step=17, max_steps=50)
    assert list(resumed) == batches[17:]
    assert list(StepBatchSampler(103, batch_size=4, seed=2, max_steps=50)) != batches


def test_step_sampler_needs_one_global_batch():
    with pytest.raises(ValueError, match="fewer than one global batch of 16"):
        StepBatchSampler(10, batch_size=8, num_processes=2, max_steps=1)
