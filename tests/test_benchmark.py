"""Tests of the benchmark machinery (hf_attn.benchmark) at tiny sizes.

No timed assertions here: speed targets live in the benchmark itself (scripts/benchmark.py).
"""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch
from conftest import cache_of
from transformers import DynamicCache

from hf_attn.benchmark import cli, report
from hf_attn.benchmark.flops import attention_context, matmul_param_count, training_flops_per_token
from hf_attn.benchmark.kv_cache import cache_nbytes
from hf_attn.benchmark.measure import peak_memory_bytes, peak_of_allocations, time_interleaved
from hf_attn.benchmark.ours import build_our_model
from hf_attn.benchmark.profiling import write_small_profiles
from hf_attn.benchmark.reference import build_reference_model
from hf_attn.benchmark.reference_gpt import RefGPT, RefGPTConfig
from hf_attn.benchmark.spec import BenchSpec, SmallSpec
from hf_attn.benchmark.suite import (
    COLUMNS,
    SMALL_REFERENCE,
    RunOptions,
    cache_bytes_curve,
    make_row,
    run_suite,
    small_builders,
)
from hf_attn.modeling_hf_attn import causal_lm_loss

TINY = BenchSpec(hidden_size=32, num_heads=2, num_layers=1, intermediate_size=64, vocab_size=64, window=8,
                 rank=4, max_positions=64)
# the small section's baby GPT shrunk to run in about a second: C = 32, I = round(8 * 32 / 3) = 85
TINY_SMALL = SmallSpec(num_layers=1, num_heads=2, hidden_size=32, block_size=16, batch=2, vocab_size=17, window=8)
TINY_ARGS = ["--seq-lens", "16,32", "--repeats", "1", "--warmup", "0", "--time-budget", "0", "--hidden-size", "32", "--num-heads", "2",
             "--num-layers", "1", "--intermediate-size", "64", "--vocab-size", "64", "--window", "8", "--rank", "4",
             "--gen-prompt", "4", "--gen-tokens", "12", "--cache-stride", "1", "--train-seq-len", "16",
             "--train-batch", "2", "--peak-matmul-size", "64", "--threads", "1"]


# --- measurement primitives -------------------------------------------------------------------

def test_peak_of_allocations_replays_events_in_time_order():
    events = [(3, -40), (1, 40), (2, 20), (4, 28), (5, -48)]
    assert peak_of_allocations(events) == 60  # 40 + 20 live before the first free


def test_peak_memory_bytes_sees_torch_cpu_allocations():
    def step():
        a = torch.empty(2_500_000)  # 10 MB
        b = torch.empty(1_250_000)  # 5 MB
        del a
        c = torch.empty(1_750_000)  # 7 MB: live b + c = 12 MB < the 15 MB peak
        return b, c

    peak = peak_memory_bytes(step)
    assert 15_000_000 <= peak < 15_000_000 + 2**20


def test_time_interleaved_runs_warmup_then_repeats_each_case():
    calls: list[str] = []
    times = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=2)
    assert calls.count("a") == calls.count("b") == 5
    assert calls[4:] == ["a", "b", "b", "a", "a", "b"]  # the order rotates every repeat
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved({"a": lambda: None}, repeats=0)


def test_time_interleaved_repeats_fast_cases_within_the_budget():
    fast = time_interleaved({"a": lambda: None, "b": lambda: None}, repeats=2, warmup=0, budget_s=60.0, max_repeats=7)
    assert {k: len(v) for k, v in fast.items()} == {"a": 7, "b": 7}  # cheap rounds: up to max_repeats
    slow = time_interleaved({"a": lambda: time.sleep(0.02)}, repeats=2, warmup=0, budget_s=0.01)
    assert len(slow["a"]) == 2  # the budget never cuts below ``repeats``


# --- KV-cache bytes -----------------------------------------------------------------------------

def test_cache_nbytes_of_hf_dynamic_cache_equals_its_keys_and_values():
    model = build_reference_model("llama_sdpa", TINY).eval()
    with torch.no_grad():
        cache = cache_of(model(torch.randint(0, 64, (2, 5)), use_cache=True))
    assert isinstance(cache, DynamicCache)
    expected = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert expected == 1 * 2 * (2 * 2 * 5 * 16) * 4  # layers * (K, V) * (B, H, T, D) * fp32
    assert cache_nbytes(cache) == expected


def test_cache_nbytes_counts_each_storage_once_and_whole():
    base = torch.zeros(100)  # 400 bytes
    holder = type("Holder", (), {})()
    holder.views = [base[:10], base[50:]]  # two views of one storage
    holder.state = {"x": torch.zeros(3, dtype=torch.float64)}  # 24 bytes
    holder.module = torch.nn.Linear(4, 4)  # weights are not cache
    assert cache_nbytes(holder) == 400 + 24
    assert cache_nbytes(None) == 0


def test_mistral_sliding_cache_is_bounded_by_the_window():
    model = build_reference_model("mistral_sdpa", TINY).eval()
    curve = dict(cache_bytes_curve(model, torch.randint(0, 64, (1, 3)), new_tokens=12))
    per_token = 2 * 2 * 16 * 4  # (K, V) * H * D * fp32, one layer
    assert curve[0] >= 3 * per_token
    assert curve[12] == curve[10] < (TINY.window + 1) * per_token  # keeps window - 1 tokens (+ a counter)


@pytest.mark.parametrize("mode", ["eager", "rope", "local", "lowrank", "lowrank_softmax"])
def test_our_cache_bytes_match_the_cache_tensors(mode):
    model = build_our_model(mode, TINY).eval()
    prompt = torch.randint(0, 64, (1, 3))
    curve = cache_bytes_curve(model, prompt, new_tokens=12)
    with torch.no_grad():
        cache = cache_of(model(prompt, use_cache=True))
    assert curve[0][1] == cache_nbytes(cache)
    # the walk also counts transformers' bookkeeping: one int64 window size per sliding layer
    assert cache_nbytes(cache) - cache.nbytes() == (8 if mode == "local" else 0)
    per_token = 2 * 2 * 16 * 4  # (K, V) * H * D * fp32, one layer
    sizes = dict(curve)
    if mode in ("eager", "rope"):
        assert sizes[12] == (3 + 12) * per_token
    elif mode == "local":
        # transformers' sliding layer keeps a view of the last w - 1 rows of the (w-row) concatenation,
        # so the storage it pins holds w tokens; + its int64 window size
        assert sizes[12] == sizes[8] == TINY.window * per_token + 8
    else:  # (S, z) state: (B, H, k, D) + (B, H, k)
        assert sizes[12] == sizes[1] == 2 * TINY.rank * (16 + 1) * 4


# --- FLOPs ---------------------------------------------------------------------------------------

def test_matmul_param_count_counts_tied_head_once():
    model = build_reference_model("llama_sdpa", TINY)
    h, i, v = 32, 64, 64
    assert matmul_param_count(model) == 4 * h * h + 3 * h * i + v * h
    gpt2 = build_reference_model("gpt2_sdpa", TINY)  # Conv1D layers; position table excluded
    assert matmul_param_count(gpt2) == 4 * h * h + 2 * h * i + v * h


def test_training_flops_per_token_and_context():
    assert training_flops_per_token(1000, 2, 64, 128) == 6 * 1000 + 12 * 2 * 64 * 128
    assert attention_context("eager", 4096, 256, 64) == 4096
    assert attention_context("local", 4096, 256, 64) == 256
    assert attention_context("local", 100, 256, 64) == 100
    assert attention_context("lowrank", 4096, 256, 64) == 64


# --- ratios and targets from rows -------------------------------------------------------------

def _rows_for_targets(local_times: dict[int, float]) -> list[dict]:
    rows = [make_row("attention", "ours_local", seq_len=n, time_s=t, cpu_time_s=t, peak_mem_bytes=n * 10)
            for n, t in local_times.items()]
    rows += [make_row("scaling", "ours_local", seq_len=n, time_s=t, cpu_time_s=t) for n, t in local_times.items()]
    rows += [make_row("attention", "sdpa_causal", seq_len=16384, time_s=20.0, peak_mem_bytes=10**9),
             make_row("attention", "mistral_sdpa", seq_len=16384, time_s=30.0, peak_mem_bytes=10**9)]
    rows += [make_row("train", "ours_eager", seq_len=1024, time_s=1.0, tokens_per_s=100.0),
             make_row("train", "ours_rope", seq_len=1024, time_s=1.04, tokens_per_s=96.0),
             make_row("train", "llama_sdpa", seq_len=1024, time_s=1.0, tokens_per_s=98.0)]
    rows += [make_row("generation_cache", "ours_local", seq_len=n, kv_cache_bytes=b)
             for n, b in ((4, 100), (8, 200), (9, 200), (12, 200))]
    return rows


def test_ratio_rows_divide_ours_by_the_reference_at_equal_length():
    rows = _rows_for_targets({8192: 1.0, 16384: 2.0})
    ratios = report.ratio_rows(rows)
    time_vs_sdpa = [r for r in ratios if r["ours"] == "ours_local" and r["reference"] == "sdpa_causal"
                    and r["metric"] == "time"]
    assert [(r["seq_len"], r["ratio"]) for r in time_vs_sdpa] == [(16384, 2.0 / 20.0)]
    train = {(r["ours"], r["metric"]): r["ratio"] for r in ratios if r["section"] == "train"}
    assert train[("ours_eager", "tokens_per_s")] == pytest.approx(100 / 98)


def test_targets_pass_and_fail_from_rows():
    targets = {t.name: t for t in report.evaluate_targets(_rows_for_targets({8192: 1.0, 16384: 2.0}), 8, 4)}
    assert targets["local_attention_speed"].passed and targets["local_attention_speed"].measured == 10.0
    assert targets["local_attention_memory"].measured == pytest.approx(10**9 / 163840)
    assert targets["local_linear_time"].measured == 2.0 and targets["local_linear_time"].passed
    assert targets["eager_train_throughput"].passed and not targets["rope_train_throughput"].passed
    assert targets["rope_overhead"].measured == pytest.approx(1.04) and targets["rope_overhead"].passed
    assert targets["local_kv_cache_constant"].passed  # lengths >= window 8: 200 bytes throughout
    assert targets["lowrank_attention_speed"].verdict == "NOT MEASURED"

    slow = {t.name: t for t in report.evaluate_targets(_rows_for_targets({4096: 1.0, 8192: 2.0, 16384: 4.5}), 8, 4)}
    assert slow["local_linear_time"].measured == 2.25 and slow["local_linear_time"].verdict == "FAIL"


def test_lent_local_targets_from_rows():
    def rows(memory: float, model_time: float) -> list[dict]:
        return [make_row("attention", "mistral_sdpa", seq_len=16384, time_s=8.0, peak_mem_bytes=1000.0),
                make_row("attention", "mistral_hf_attn_local", seq_len=16384, time_s=0.5, peak_mem_bytes=memory),
                make_row("model", "mistral_sdpa", seq_len=16384, time_s=20.0),
                make_row("model", "mistral_hf_attn_local", seq_len=16384, time_s=model_time)]

    good = {t.name: t for t in report.evaluate_targets(rows(memory=90.0, model_time=3.0), 256, 4)}
    assert good["lent_local_attention_memory"].passed and good["lent_local_attention_memory"].measured == pytest.approx(1000 / 90)
    assert good["lent_local_model_speed"].passed and good["lent_local_model_speed"].measured == pytest.approx(20 / 3)
    bad = {t.name: t for t in report.evaluate_targets(rows(memory=150.0, model_time=5.0), 256, 4)}
    assert bad["lent_local_attention_memory"].verdict == bad["lent_local_model_speed"].verdict == "FAIL"
    assert make_row("model", "mistral_hf_attn_local")["side"] == "ours"  # our kernel in a stock model


def test_chunked_loss_memory_targets_from_rows():
    def rows(local: float, lowrank: float) -> list[dict]:
        return [make_row("model", "ours_local_unfused", seq_len=16384, time_s=1.0, peak_mem_bytes=1000.0),
                make_row("model", "ours_local", seq_len=16384, time_s=1.0, peak_mem_bytes=local),
                make_row("model", "ours_lowrank_unfused", seq_len=16384, time_s=1.0, peak_mem_bytes=1000.0),
                make_row("model", "ours_lowrank", seq_len=16384, time_s=1.0, peak_mem_bytes=lowrank)]

    targets = {t.name: t for t in report.evaluate_targets(rows(400.0, 600.0), 256, 4)}
    assert targets["local_model_memory_chunked_loss"].passed
    assert targets["local_model_memory_chunked_loss"].measured == pytest.approx(2.5)
    assert targets["lowrank_model_memory_chunked_loss"].verdict == "FAIL"


def test_unfused_variants_differ_only_in_the_loss():
    from hf_attn.benchmark.ours import our_config

    for mode in ("local", "lowrank"):
        chunked, full = our_config(mode, TINY), our_config(f"{mode}_unfused", TINY)
        assert (full.loss_chunk_size, full.fused_ops) == (0, False) and chunked.loss_chunk_size > 0 and chunked.fused_ops
        assert {**full.to_dict(), "loss_chunk_size": chunked.loss_chunk_size, "fused_ops": True} == chunked.to_dict()


# --- the whole pipeline at tiny sizes --------------------------------------------------------

def test_lent_local_rows_run_side_by_side_with_mistral_sdpa():
    """MistralForCausalLM / MistralAttention with attn_implementation="hf_attn_local" next to sdpa."""
    cases = ("mistral_sdpa", "mistral_hf_attn_local")
    opts = RunOptions(seq_lens=(16, 32), modes=(), reference_models=cases, reference_layers=cases,
                      sections=("attention", "model"), repeats=1, warmup=0, time_budget_s=0.0, peak_matmul_size=64)
    rows, _ = run_suite(opts, TINY, log=lambda _: None)
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    lent = [r for r in rows if r["case"] == "mistral_hf_attn_local"]
    assert {(r["section"], r["seq_len"]) for r in lent} == {(s, n) for s in ("attention", "model") for n in (16, 32)}
    assert all(r["implementation"] == "hf_attn_local" and r["side"] == "ours" and r["attention"] == "local"
               for r in lent)
    ratios = report.ratio_rows(rows)
    measured = {(r["section"], r["metric"], r["seq_len"]) for r in ratios
                if (r["ours"], r["reference"]) == ("mistral_hf_attn_local", "mistral_sdpa")}
    assert {("attention", "memory", 32), ("model", "time", 32), ("model", "memory", 16)} <= measured
    assert "mistral_hf_attn_local / mistral_sdpa" in report.ratio_table(ratios, "model", "time")
    targets = {t.name: t for t in report.evaluate_targets(rows, TINY.window, TINY.rank)}
    assert targets["lent_local_model_speed"].verdict == "NOT MEASURED"  # needs n=16384



def test_memory_budget_skips_are_recorded_not_dropped():
    opts = RunOptions(seq_lens=(16,), modes=("local",), reference_layers=("mistral_eager",), sections=("attention",),
                      repeats=1, warmup=0, time_budget_s=0.0, mem_budget_bytes=1, peak_matmul_size=64)
    rows, _ = run_suite(opts, TINY, log=lambda _: None)
    statuses = {r["case"]: (r["status"], r["note"]) for r in rows}
    assert statuses["ours_local"][0] == "ok"
    assert statuses["mistral_eager"][0] == "skipped" and "memory budget" in statuses["mistral_eager"][1]


def test_cli_smoke_run_writes_well_formed_results(tmp_path, capsys):
    assert cli.main([*TINY_ARGS, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Targets:" in printed and "threads 1" in printed and "dtype float32" in printed

    with open(tmp_path / "results.csv", newline="", encoding="utf-8") as fh:
        csv_rows = list(csv.DictReader(fh))
    payload = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    rows = payload["rows"]
    assert len(csv_rows) == len(rows) > 0
    assert list(csv_rows[0]) == list(COLUMNS)
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    cases = {(r["section"], r["case"]) for r in rows}
    for mode in ("eager", "local", "lowrank", "rope"):
        for section in ("attention", "kernel", "scaling", "model", "generation", "generation_cache", "train"):
            skipped = (section, mode) == ("kernel", "rope") or (section == "scaling" and mode in ("eager", "rope"))
            assert ((section, f"ours_{mode}") in cases) != skipped
    for section in ("attention", "kernel", "model"):
        for r in report.ok_rows(rows, section):
            assert r["time_s"] > 0 and r["peak_mem_bytes"] > 0 and r["seq_len"] in (16, 32)
            assert r["time_s_min"] <= r["time_s"] <= r["time_s_max"] and r["repeats"] == 1
    for r in report.ok_rows(rows, "train"):
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["time_s"]) and 0 < r["mfu"]
    gen_cache = [r for r in rows if r["section"] == "generation_cache" and r["case"] == "ours_local"]
    assert [r["gen_len"] for r in gen_cache] == list(range(13))

    # every ratio is recomputable from the rows it names
    index = {(r["section"], r["case"], r["seq_len"]): r for r in rows}
    for ratio in payload["ratios"]:
        column = report.RATIO_METRICS[ratio["metric"]]
        ours = index[(ratio["section"], ratio["ours"], ratio["seq_len"])][column]
        ref = index[(ratio["section"], ratio["reference"], ratio["seq_len"])][column]
        assert ratio["ratio"] == pytest.approx(ours / ref)
    assert {t["verdict"] for t in payload["targets"]} <= {"PASS", "FAIL", "NOT MEASURED"}
    assert payload["environment"]["threads"] == 1 and payload["environment"]["matmul_peak_flops"] > 0
    for name in ("attention.png", "kernel.png", "model.png", "generation.png", "train.png", "summary.md", "ratios.csv"):
        assert (tmp_path / name).stat().st_size > 0

    # re-rendering from results.json measures nothing and reproduces ratios and targets
    again = tmp_path / "again"
    assert cli.main(["--from-json", str(tmp_path / "results.json"), "--out", str(again)]) == 0
    rerendered = json.loads((again / "results.json").read_text(encoding="utf-8"))
    assert rerendered["rows"] == rows and rerendered["targets"] == payload["targets"]
    assert payload["environment"]["command"] in (again / "summary.md").read_text(encoding="utf-8")


# --- the small section: a minimal reference GPT against hf_attn at baby-GPT size ----------------

def test_reference_gpt_is_a_causal_lm_with_tied_embeddings_and_the_shifted_loss():
    config = RefGPTConfig(vocab_size=17, block_size=8, num_layers=2, num_heads=2, hidden_size=16)
    model = RefGPT(config)
    assert model.lm_head.weight is model.embed_tokens.weight
    c = 16
    assert model.num_parameters() == 17 * c + 8 * c + 2 * (2 * c + 4 * c * c + 8 * c * c) + c
    ids = torch.randint(0, 17, (3, 8), generator=torch.Generator().manual_seed(0))
    targets = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], dim=1)
    logits, loss = model(ids, targets)
    assert logits.shape == (3, 8, 17)
    torch.testing.assert_close(loss, causal_lm_loss(logits, ids))  # what hf_attn computes from labels=ids
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 17
    torch.testing.assert_close(model(changed)[0][:, :5], logits[:, :5])  # causal: the past ignores the future
    with pytest.raises(ValueError, match="block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="num_heads=3"):
        RefGPTConfig(num_heads=3, hidden_size=16)


def test_small_section_rows_ratios_and_targets_are_well_formed(tmp_path, capsys):
    threads = torch.get_num_threads()
    opts = RunOptions(sections=("small",), repeats=2, warmup=0, time_budget_s=0.0, peak_matmul_size=64,
                      small=TINY_SMALL)
    rows, env = run_suite(opts, TINY, log=lambda _: None)
    assert torch.get_num_threads() == threads  # the section's one thread is restored
    assert [r["case"] for r in rows] == list(small_builders(TINY_SMALL))
    assert all(r["status"] == "ok" and r["section"] == "small" for r in rows), [r for r in rows if r["status"] != "ok"]
    for r in rows:
        assert (r["seq_len"], r["batch"], r["repeats"]) == (16, 2, 2)
        assert 0 < r["time_s_min"] <= r["time_s"] <= r["time_s_max"] and r["cpu_time_s"] > 0 and r["peak_mem_bytes"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["time_s"])
        assert r["note"].startswith("1 thread(s); ")
    # parameter counts, honestly matched: the same embeddings (tied) and attention, SwiGLU I = 88 (85, the
    # exact parity width, rounded up to a multiple of 8) vs 4x GELU
    by_case = {r["case"]: r for r in rows}
    c, v, n, i = 32, 17, 16, TINY_SMALL.intermediate_size
    assert i == 88 and TINY_SMALL.parity_intermediate_size == 85
    embeddings_and_norms = v * c + n * c + 2 * c + c
    assert by_case[SMALL_REFERENCE]["params"] == embeddings_and_norms + 4 * c * c + 8 * c * c
    assert by_case["ours_eager"]["params"] == embeddings_and_norms + 4 * c * c + 3 * c * i
    assert by_case["ours_rope"]["params"] == by_case["ours_eager"]["params"] - n * c  # no position table
    assert by_case["ours_local"]["params"] == by_case["ours_local_full"]["params"] == by_case["ours_eager"]["params"]
    assert by_case["ours_eager_parity"]["params"] == by_case["ours_eager"]["params"] - 3 * c * (88 - 85)
    assert "I=88" in by_case["ours_eager"]["note"] and "sliding_window=16 >= n" in by_case["ours_local_full"]["note"]
    # built with the reference's architecture: exactly the reference's parameters (rope: less the position table)
    assert by_case["ours_eager_gpt"]["params"] == by_case[SMALL_REFERENCE]["params"]
    assert by_case["ours_rope_gpt"]["params"] == by_case[SMALL_REFERENCE]["params"] - n * c
    assert "norm_type='layernorm'" in by_case["ours_eager_gpt"]["note"]

    ratios = [r for r in report.ratio_rows(rows) if r["section"] == "small"]
    time_ratios = {r["ours"]: r["ratio"] for r in ratios if r["metric"] == "time"}
    assert set(time_ratios) == {case for case in by_case if case != SMALL_REFERENCE}
    assert all(r["reference"] == SMALL_REFERENCE for r in ratios)
    for case, ratio in time_ratios.items():
        assert ratio == pytest.approx(by_case[case]["time_s"] / by_case[SMALL_REFERENCE]["time_s"])
    targets = {t.name: t for t in report.evaluate_targets(rows, TINY.window, TINY.rank) if t.name.startswith("small_")}
    expected = {"small_eager_step": ("ours_eager", SMALL_REFERENCE), "small_rope_step": ("ours_rope", SMALL_REFERENCE),
                "small_eager_gpt_step": ("ours_eager_gpt", SMALL_REFERENCE),
                "small_rope_gpt_step": ("ours_rope_gpt", SMALL_REFERENCE),
                "small_local_full_window": ("ours_local_full", "ours_eager"),
                "small_lowrank_step": ("ours_lowrank", "ours_eager")}
    assert set(targets) == set(expected)
    for name, (ours, by) in expected.items():
        assert targets[name].measured == pytest.approx(by_case[ours]["time_s"] / by_case[by]["time_s"])
        assert targets[name].verdict in ("PASS", "FAIL")
    table = report.small_table(rows)
    assert all(f"| {case} |" in table for case in by_case) and "/ eager" in table and "| 1.000 |" in table

    # rendered from the rows like any run: the console shows the table and the verdicts
    all_targets = report.evaluate_targets(rows, TINY.window, TINY.rank)
    report.write_results(tmp_path, rows, env, all_targets, report.ratio_rows(rows))
    assert cli.main(["--from-json", str(tmp_path / "results.json"), "--out", str(tmp_path / "again")]) == 0
    printed = capsys.readouterr().out
    assert "[small] baby-GPT training step" in printed and "ours_local_full / refgpt_sdpa" in printed
    assert all(name in printed for name in expected)
    assert "Small size: baby-GPT training step" in (tmp_path / "again" / "summary.md").read_text(encoding="utf-8")
    assert (tmp_path / "again" / "small.png").stat().st_size > 0


def test_small_section_measures_compiled_cases_next_to_the_others():
    """``small_compiled``: the named cases again under ``torch.compile(fullgraph=True)``, as
    ``<case>_compiled`` rows of the same interleaved rounds; an unknown case is refused by name."""
    opts = RunOptions(sections=("small",), repeats=2, warmup=0, time_budget_s=0.0, peak_matmul_size=64,
                      small=TINY_SMALL, small_compiled=("ours_eager", SMALL_REFERENCE), compile_backend="eager")
    rows, _ = run_suite(opts, TINY, log=lambda _: None)
    by_case = {r["case"]: r for r in rows}
    assert list(by_case)[-2:] == ["ours_eager_compiled", SMALL_REFERENCE + "_compiled"]
    for case in ("ours_eager", SMALL_REFERENCE):
        compiled = by_case[case + "_compiled"]
        assert compiled["status"] == "ok" and compiled["repeats"] == 2 and compiled["time_s"] > 0
        assert compiled["params"] == by_case[case]["params"]
        assert "torch.compile(fullgraph=True, backend='eager')" in compiled["note"]
    assert "| ours_eager_compiled |" in report.small_table(rows)
    with pytest.raises(ValueError, match="small_compiled.*'ours_bogus'"):
        RunOptions(sections=("small",), small_compiled=("ours_bogus",)).validate()


def test_small_profiles_compare_every_case_with_the_reference(tmp_path):
    paths = write_small_profiles(tmp_path, TINY_SMALL, steps=1)
    assert [p.name for p in paths] == [f"profile_small_{c}.txt" for c in small_builders(TINY_SMALL)] + [
        "profile_small_vs_reference.txt"]
    eager = (tmp_path / "profile_small_ours_eager.txt").read_text(encoding="utf-8")
    assert "aten::mm" in eager and "Python functions per step" in eager and "modeling_hf_attn.py" in eager
    diff = (tmp_path / "profile_small_vs_reference.txt").read_text(encoding="utf-8")
    assert diff.count("## ours_") == len(paths) - 2 and "all operators" in diff


# --- the compile section: torch.compile(fullgraph=True) against the same model uncompiled -------

def test_compile_section_rows_are_well_formed(tmp_path, capsys):
    argv = [*TINY_ARGS, "--sections", "compile", "--compile-backend", "aot_eager", "--compile-train-seq-len", "16",
            "--compile-train-batch", "2", "--compile-gen-prompt", "4", "--compile-gen-tokens", "4", "--out",
            str(tmp_path)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "[compile]" in printed and "compiled / uncompiled" in printed
    payload = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    rows = payload["rows"]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    defaults = RunOptions()
    expected = {("compile_train", case, compiled) for case in defaults.compile_train_cases for compiled in (False, True)}
    expected |= {("compile_decode", case, compiled) for case in defaults.compile_gen_cases for compiled in (False, True)}
    assert {(r["section"], r["case"], r["compiled"]) for r in rows} == expected and len(rows) == len(expected)
    for r in rows:
        assert r["time_s"] > 0 and r["time_s_min"] <= r["time_s"] <= r["time_s_max"] and r["repeats"] == 1
        if r["section"] == "compile_train":
            assert (r["seq_len"], r["batch"]) == (16, 2)
            assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["time_s"])
        else:
            assert (r["seq_len"], r["gen_len"], r["batch"]) == (8, 4, 1)
            assert r["tokens_per_s"] == pytest.approx(4 / r["time_s"])
        if r["compiled"]:
            assert r["compile_s"] >= 0 and "backend=aot_eager" in r["note"] and "; 0 graph(s)" not in r["note"]
        else:
            assert r["compile_s"] is None
    table = report.compile_table(rows)
    assert len(table.splitlines()) == 2 + len(expected) // 2
    assert "compiled / uncompiled" in (tmp_path / "summary.md").read_text(encoding="utf-8")
