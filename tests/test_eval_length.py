"""Perplexity versus context length (hf_attn/analysis/context_length.py, scripts/eval_length.py), on tiny
checkpoints written by the project's own trainer on a few stdlib modules."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from datasets import DatasetDict
from PIL import Image

from hf_attn.analysis.context_length import (
    CSV_COLUMNS,
    CheckpointSpec,
    EvalSettings,
    evaluate_lengths,
    load_checkpoint,
    parse_checkpoint_spec,
    position_limit,
    read_csv,
    sliding_perplexity,
    sliding_windows,
    validation_stream,
)
from hf_attn.training import train
from hf_attn.training.config import apply_overrides, config_from_dict, load_config
from hf_attn.training.data import load_raw_datasets, stdlib_root, tokenize_and_pack

REPO = Path(__file__).resolve().parents[1]
MODULES = ["bisect.py", "colorsys.py", "fnmatch.py", "glob.py", "heapq.py", "keyword.py", "shlex.py", "textwrap.py"]
TRAINED = 32  # block size and (eager) max_position_embeddings of the tiny runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Final folders of two tiny trainer runs, eager (learned positions up to 32) and rope."""
    root = tmp_path_factory.mktemp("eval_length")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in MODULES:
        (corpus / name).write_text((stdlib_root() / name).read_text(encoding="utf-8"), encoding="utf-8")
    previous_cache, threads = datasets.config.HF_DATASETS_CACHE, torch.get_num_threads()
    datasets.config.HF_DATASETS_CACHE = root / "cache"
    torch.set_num_threads(1)
    folders = {}
    try:
        for mode in ("eager", "rope"):
            overrides = {
                "model.attention_mode": mode, "model.hidden_size": 32, "model.num_hidden_layers": 2,
                "model.num_attention_heads": 2, "model.max_position_embeddings": TRAINED,
                "data.dataset": "files", "data.data_files": [str(corpus)], "data.validation_fraction": 0.25,
                "data.block_size": TRAINED, "data.cache_dir": str(root / "cache"), "tokenizer.vocab_size": 320,
                "training.output_dir": str(root / mode), "training.max_steps": 3, "training.per_device_batch_size": 4,
                "training.learning_rate": 5e-3, "training.eval_every": None, "training.checkpoint_every": None,
                "training.report_to": "none",
            }
            folders[mode] = train(config_from_dict(apply_overrides({}, overrides))).final_dir
        yield folders
    finally:
        datasets.config.HF_DATASETS_CACHE = previous_cache
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n,length,stride", [(10, 4, 2), (11, 4, 4), (9, 9, 3), (23, 8, 3), (17, 5, 1)])
def test_sliding_windows_score_every_token_once(n, length, stride):
    windows = sliding_windows(n, length, stride)
    scored = [start + o for start, first in windows for o in range(first, length)]
    if stride < length:  # overlapping windows reach every token but the first
        assert scored == list(range(1, n))
        # after the first window every scored token has at least length - stride tokens of context
        assert all(first >= length - stride for _, first in windows[1:])
    else:  # non-overlapping: training's blocks, whose first tokens are context only
        assert sorted(scored) == [t for t in range(1, n) if t % length or t >= n // length * length]
    assert all(start + length <= n for start, _ in windows)


def test_sliding_windows_reject_impossible_sizes():
    for args in [(10, 11, 2), (10, 4, 0), (10, 4, 5)]:
        with pytest.raises(ValueError, match="need 1 <= stride"):
            sliding_windows(*args)


def test_stream_is_the_validation_split_training_used(runs):
    folder = runs["eager"]
    _, tokenizer = load_checkpoint(CheckpointSpec(folder))
    ids, block_size = validation_stream(folder, tokenizer)
    assert block_size == TRAINED
    config = load_config(folder / "training_config.yaml")
    raw = load_raw_datasets(config.data)
    blocks = tokenize_and_pack(DatasetDict(validation=raw["validation"]), tokenizer, TRAINED)["validation"]
    training_blocks = torch.stack(list(blocks["input_ids"]))  # what training evaluated
    assert torch.equal(ids[: training_blocks.numel()], training_blocks.reshape(-1))


def test_non_overlapping_windows_give_trainings_block_perplexity(runs):
    model, tokenizer = load_checkpoint(CheckpointSpec(runs["eager"]))
    ids, _ = validation_stream(runs["eager"], tokenizer)
    ids = ids[: 5 * TRAINED]
    ppl, count = sliding_perplexity(model, ids, TRAINED, stride=TRAINED, batch_tokens=2 * TRAINED)
    blocks = ids.view(5, TRAINED)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert count == 5 * (TRAINED - 1)
    assert ppl == pytest.approx(math.exp(float(reference)), rel=1e-5)


def test_rope_scaling_is_applied_at_load_time(runs):
    plain, _ = load_checkpoint(CheckpointSpec(runs["rope"]))
    linear, _ = load_checkpoint(parse_checkpoint_spec(f"{runs['rope']}@linear:4"))
    dynamic, _ = load_checkpoint(parse_checkpoint_spec(f"{runs['rope']}@dynamic:2"))
    assert (linear.model.rotary.scaling_type, linear.model.rotary.factor) == ("linear", 4.0)
    assert (dynamic.model.rotary.scaling_type, dynamic.model.rotary.factor) == ("dynamic", 2.0)
    short, long = torch.arange(TRAINED)[None] % 300, torch.arange(3 * TRAINED)[None] % 300
    with torch.no_grad():
        assert not torch.allclose(plain(short).logits, linear(short).logits)
        # dynamic NTK changes nothing up to the trained length, everything beyond it
        torch.testing.assert_close(plain(short).logits, dynamic(short).logits)
        assert not torch.allclose(plain(long).logits, dynamic(long).logits)
    with pytest.raises(ValueError, match="needs rotary positions"):
        load_checkpoint(parse_checkpoint_spec(f"{runs['eager']}@linear:4"))
    assert position_limit(plain.config) is None and position_limit(load_checkpoint(CheckpointSpec(runs["eager"]))[0].config) == TRAINED


@pytest.mark.parametrize("spec", ["x@cubic:2", "x@linear:0.5", "x@dynamic:", "x@linear:two"])
def test_bad_scaling_specs_are_refused(spec):
    with pytest.raises(ValueError, match="rope scaling"):
        parse_checkpoint_spec(spec)


def eval_script():
    spec = importlib.util.spec_from_file_location("eval_length_script", REPO / "scripts" / "eval_length.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_script_writes_csv_and_png_and_marks_eager_beyond_its_limit(runs, tmp_path, capsys):
    lengths = [16, 32, 64, 128]
    args = [str(runs["eager"]), str(runs["rope"]), f"{runs['rope']}@dynamic:2", "--lengths", ",".join(map(str, lengths)),
            "--max-tokens", "600", "--out", str(tmp_path)]
    assert eval_script()(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert "| checkpoint | L=16 | L=32 | L=64 | L=128 |" in table
    assert [line for line in table if line.startswith("| eager |")][0].endswith("| \u2014 | \u2014 |")
    with (tmp_path / "perplexity_vs_length.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
    rows = read_csv(tmp_path / "perplexity_vs_length.csv")
    assert [(r.checkpoint, r.length) for r in rows] == [(c, n) for c in ("eager", "rope", "rope@dynamic:2") for n in lengths]
    for row in rows:
        beyond = row.checkpoint == "eager" and row.length > TRAINED
        assert math.isnan(row.perplexity) == beyond
        if beyond:
            assert row.tokens == 0 and f"max_position_embeddings={TRAINED}" in row.note
        else:
            assert math.isfinite(row.perplexity) and 1 < row.perplexity < 320 and row.note == ""
            assert row.tokens == 599 and row.stride == row.length // 2  # the same tokens at every length
    rope = {r.length: r.perplexity for r in rows if r.checkpoint == "rope"}
    dynamic = {r.length: r.perplexity for r in rows if r.checkpoint == "rope@dynamic:2"}
    assert dynamic[16] == pytest.approx(rope[16]) and dynamic[32] == pytest.approx(rope[32])
    with Image.open(tmp_path / "perplexity_vs_length.png") as image:
        image.verify()
    with Image.open(tmp_path / "perplexity_vs_length.png") as image:
        assert image.size == (1000, 500)


def test_script_refuses_bad_arguments_before_any_work(runs, tmp_path, capsys):
    for args in (["--lengths", "1,8"], ["--lengths", "8", "--foo", "1"], ["--lengths", "8", "--config", str(tmp_path / "none.yaml")]):
        with pytest.raises(SystemExit):
            eval_script()([str(runs["eager"]), *args, "--out", str(tmp_path)])
    assert not (tmp_path / "perplexity_vs_length.csv").exists()


def test_parallel_jobs_give_the_same_numbers(runs):
    specs = [CheckpointSpec(runs["eager"]), parse_checkpoint_spec(f"{runs['rope']}@linear:2")]
    settings = EvalSettings(max_tokens=300)
    serial = evaluate_lengths(specs, [8, 64], settings, log=lambda _: None)
    parallel = evaluate_lengths(specs, [8, 64], settings, jobs=2)
    def strip(rows):  # (nan != nan, and timings differ)
        return [dict(vars(r), seconds=0, perplexity=f"{r.perplexity:.6g}") for r in rows]

    assert strip(serial) == strip(parallel)
    assert [r.checkpoint for r in serial] == ["eager", "eager", "rope@linear:2", "rope@linear:2"]
    assert {r.train_length for r in serial} == {TRAINED}
