"""The benchmark sections: each measures ours and the references side by side and returns result rows.

Sections:

- ``attention``: one attention layer (projections included), forward + backward, time and peak
  memory at every sequence length; ours (one per mode) against ``reference.REFERENCE_LAYERS``.
- ``kernel``: the same without the projections: the attention math alone (mask creation included).
- ``scaling``: the ``local`` and ``lowrank`` layers at every length in the same interleaved rounds,
  for the time-growth targets (the per-length groups above run minutes apart).
- ``model``: the whole small model, forward + backward of the LM loss, same measurements;
  ours against ``reference.REFERENCE_MODELS``.
- ``generation``: greedy ``generate()`` tokens/s, and the bytes the cache holds after each step
  (rows of section ``generation_cache``) against the generated length.
- ``train``: full training steps (forward, backward, AdamW) at one training length: tokens/s and
  MFU against the machine's matmul peak (measured at the start and at the end of the run, the best
  of both kept).
- ``small`` (only when asked for): training steps at the classic baby-GPT size (``spec.SmallSpec``:
  4 layers, 4 heads, hidden 128, block 64, batch 12, vocabulary 65, one thread), where per-forward
  Python overhead is a visible share of a step: ours in every mode, with local both windowed
  (w < n) and full-window (n <= w), against the minimal GPT of ``reference_gpt``.

Every row is a flat dict with the keys of ``COLUMNS``; timings are medians of interleaved repeats,
warm-up excluded (``measure.time_interleaved``). A case whose predicted peak memory or step time at
the next length exceeds the budget (quadratic extrapolation from its last measured length, or an
analytic estimate for layers that materialise (n, n) scores) is recorded as ``skipped`` with the
reason, never silently dropped; a case that raises is recorded as ``error``.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..cpu_kernels import describe as describe_cpu_kernels
from ..cpu_kernels import switched
from .flops import attention_context, matmul_param_count, training_flops_per_token
from .kv_cache import cache_nbytes
from .measure import (
    StepFn,
    Timing,
    frozen_heap,
    matmul_peak_flops,
    median,
    peak_memory_bytes,
    time_call,
    time_interleaved,
    torch_threads,
)
from .ours import base_mode, build_our_layer, build_our_model, build_small_model
from .reference import (
    LENT_CASES,
    REFERENCE_ATTENTION_KIND,
    REFERENCE_LAYERS,
    REFERENCE_MODELS,
    build_reference_layer,
    build_reference_model,
)
from .reference_gpt import RefGPT, RefGPTConfig
from .spec import BenchSpec, SmallSpec

SECTIONS = ("attention", "kernel", "scaling", "model", "generation", "train", "small", "compile")
# what a run measures when --sections is not given: ``small`` asks a different question (overhead at a
# tiny size, on one thread) and ``compile`` spends minutes compiling graphs; both run only on request
DEFAULT_SECTIONS = SECTIONS[:-2]
# the four attention modes, plus lowrank with the softmax feature map, and local / lowrank with the loss
# over full logits (ours.MODE_VARIANTS; the last two only where named: they differ only in the LM loss)
ATTENTION_MODES = ("eager", "local", "lowrank", "rope", "lowrank_softmax", "local_unfused", "lowrank_unfused")
DEFAULT_MODES = ATTENTION_MODES[:5]
OURS_PREFIX = "ours_"
# References that form the (B, H, n, n) scores in every layer: their memory is estimated before running.
MATERIALISE_SCORES = {"gpt2_eager", "mistral_eager"}

COLUMNS = (
    "section", "case", "side", "attention", "implementation", "seq_len", "batch", "gen_len", "repeats",
    "time_s", "time_s_min", "time_s_max", "times_s", "cpu_time_s", "peak_mem_bytes", "tokens_per_s", "kv_cache_bytes",
    "flops_per_token", "mfu", "params", "status", "note", "compiled", "compile_s",
)

Log = Callable[[str], None]


@dataclass
class RunOptions:
    """What one benchmark run measures (the CLI flags map onto these fields)."""

    seq_lens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    modes: tuple[str, ...] = DEFAULT_MODES
    reference_models: tuple[str, ...] = tuple(REFERENCE_MODELS)
    reference_layers: tuple[str, ...] = REFERENCE_LAYERS
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    repeats: int = 3
    warmup: int = 1
    time_budget_s: float = 10.0
    batch: int = 1
    gen_prompt: int = 32
    gen_tokens: int = 512
    cache_stride: int = 8
    train_seq_len: int = 1024
    train_batch: int = 4
    mem_budget_bytes: int = 8 * 2**30
    max_case_seconds: float = 120.0
    peak_matmul_size: int = 4096
    small: SmallSpec = field(default_factory=SmallSpec)
    # section ``small``: cases also measured under torch.compile (``compile_backend``), as ``<case>_compiled``
    small_compiled: tuple[str, ...] = ()
    # section ``compile``: torch.compile backend, training size, decoding prompt / new tokens, cases
    compile_backend: str = "inductor"
    compile_train_seq_len: int = 256
    compile_train_batch: int = 2
    compile_gen_prompt: int = 16
    compile_gen_tokens: int = 32
    compile_train_cases: tuple[str, ...] = ("ours_eager", "ours_rope", "ours_local", "ours_lowrank", "llama_sdpa")
    compile_gen_cases: tuple[str, ...] = ("ours_eager", "ours_rope", "ours_local")
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option when a value cannot be run."""
        for name, values, allowed in (
            ("modes", self.modes, ATTENTION_MODES),
            ("reference_models", self.reference_models, tuple(REFERENCE_MODELS)),
            ("reference_layers", self.reference_layers, REFERENCE_LAYERS),
            ("sections", self.sections, SECTIONS),
        ):
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ValueError(f"{name}={list(values)} is invalid: {unknown} unknown; allowed values are {list(allowed)}")
        for name in ("repeats", "batch", "gen_prompt", "gen_tokens", "cache_stride", "train_seq_len", "train_batch",
                     "compile_train_seq_len", "compile_train_batch", "compile_gen_prompt", "compile_gen_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected an integer >= 1")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} is invalid: expected an integer >= 0")
        if not self.seq_lens or min(self.seq_lens) < 1:
            raise ValueError(f"seq_lens={list(self.seq_lens)} is invalid: expected positive integers")
        self.small.validate()
        known = set(small_builders(self.small))
        unknown = [c for c in self.small_compiled if c not in known]
        if unknown:
            raise ValueError(f"small_compiled={list(self.small_compiled)} is invalid: {unknown} unknown; allowed values "
                             f"are {sorted(known)}")


def make_row(section: str, case: str, **fields: object) -> dict:
    """A result row with every column of ``COLUMNS`` (missing ones ``None``); ``side`` and ``attention``
    are derived from the case name (a stock model running our kernel, ``LENT_CASES``, is ours)."""
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown result columns {sorted(unknown)}; allowed are {list(COLUMNS)}")
    row: dict = dict.fromkeys(COLUMNS)
    prefixed = case.startswith(OURS_PREFIX)
    row.update(section=section, case=case, side="ours" if prefixed or case in LENT_CASES else "reference",
               attention=case[len(OURS_PREFIX):] if prefixed else REFERENCE_ATTENTION_KIND.get(case), status="ok")
    row.update(fields)
    return row


def _timing_fields(timings: list[Timing]) -> dict:
    wall = [t.wall for t in timings]
    return {"time_s": median(wall), "time_s_min": min(wall), "time_s_max": max(wall),
            "times_s": " ".join(f"{t:.6g}" for t in wall), "cpu_time_s": median([t.cpu for t in timings]),
            "repeats": len(wall)}


def _implementation(module: nn.Module) -> str | None:
    config = getattr(module, "config", None) or getattr(getattr(module, "model", None), "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


class _Guard:
    """Predicts whether a case fits the memory and time budgets at the next sequence length."""

    def __init__(self, opts: RunOptions, spec: BenchSpec, layers: int) -> None:
        self.opts, self.spec, self.layers = opts, spec, layers
        self.last: dict[str, tuple[int, int, float]] = {}  # case -> (n, peak bytes, seconds)

    def record(self, case: str, n: int, peak: int, seconds: float) -> None:
        self.last[case] = (n, peak, seconds)

    def skip_reason(self, case: str, n: int) -> str | None:
        """Why ``case`` is not run at length ``n``, or ``None`` to run it."""
        budget = self.opts.mem_budget_bytes
        elem = torch.finfo(self.spec.dtype).bits // 8
        if case in MATERIALISE_SCORES:
            # scores, softmax kept for backward, and their gradient, per layer
            need = 3 * self.layers * self.opts.batch * self.spec.num_heads * n * n * elem
            if need > budget:
                return f"estimated (n, n) scores {need / 2**30:.1f} GiB > memory budget {budget / 2**30:.1f} GiB"
        if case in self.last:
            n0, peak, seconds = self.last[case]
            growth = (n / n0) ** 2  # pessimistic: quadratic
            if peak * growth > budget:
                return (f"predicted peak {peak * growth / 2**30:.1f} GiB (x(n/{n0})^2) > memory budget "
                        f"{budget / 2**30:.1f} GiB")
            if seconds * growth > self.opts.max_case_seconds:
                return (f"predicted step {seconds * growth:.0f} s (x(n/{n0})^2) > time budget "
                        f"{self.opts.max_case_seconds:.0f} s")
        return None


def _fwd_bwd_section(
    section: str,
    builders: dict[str, Callable[[], nn.Module]],
    make_step: Callable[[nn.Module, int], StepFn],
    opts: RunOptions,
    spec: BenchSpec,
    layers: int,
    log: Log,
    extra_fields: Callable[[str, nn.Module, int, float], dict] | None = None,
) -> list[dict]:
    """Shared loop of the ``attention``, ``kernel`` and ``model`` sections: every case at every length, the
    cases of one length interleaved."""
    rows: list[dict] = []
    modules: dict[str, nn.Module] = {}
    failed: dict[str, str] = {}
    for case, build in builders.items():
        try:
            torch.manual_seed(opts.seed)
            modules[case] = build().train()
        except Exception as exc:  # noqa: BLE001 - a broken case is reported, the run goes on
            failed[case] = f"build failed: {type(exc).__name__}: {exc}"
    guard = _Guard(opts, spec, layers)
    for n in opts.seq_lens:
        steps: dict[str, StepFn] = {}
        peaks: dict[str, int] = {}
        for case in builders:
            if case in failed:
                rows.append(make_row(section, case, seq_len=n, batch=opts.batch, status="error", note=failed[case]))
                continue
            reason = guard.skip_reason(case, n)
            if reason is not None:
                log(f"  {section} n={n} {case}: skipped ({reason})")
                rows.append(make_row(section, case, seq_len=n, batch=opts.batch, status="skipped", note=reason))
                continue
            try:
                step = make_step(modules[case], n)
                for _ in range(opts.warmup):
                    step()
                peaks[case] = peak_memory_bytes(step)
                steps[case] = step
            except Exception as exc:  # noqa: BLE001
                failed[case] = f"n={n}: {type(exc).__name__}: {exc}"
                log(f"  {section} n={n} {case}: error {failed[case]}")
                rows.append(make_row(section, case, seq_len=n, batch=opts.batch, status="error", note=failed[case]))
        times = time_interleaved(steps, opts.repeats, warmup=0, budget_s=opts.time_budget_s)
        for case, case_times in times.items():
            row = make_row(section, case, seq_len=n, batch=opts.batch, peak_mem_bytes=peaks[case],
                           implementation=_implementation(modules[case]), **_timing_fields(case_times))
            if extra_fields is not None:
                row.update(extra_fields(case, modules[case], n, row["time_s"]))
            guard.record(case, n, peaks[case], row["time_s"])
            rows.append(row)
            log(f"  {section} n={n:>6} {case:<16} {row['time_s'] * 1e3:10.1f} ms  "
                f"{peaks[case] / 2**20:9.1f} MiB")
        del steps
        gc.collect()
    return rows


def _attention_builders(opts: RunOptions, spec: BenchSpec) -> dict[str, Callable[[], nn.Module]]:
    builders: dict[str, Callable[[], nn.Module]] = {
        OURS_PREFIX + mode: (lambda m=mode: build_our_layer(m, spec)) for mode in opts.modes
    }
    builders.update({name: (lambda r=name: build_reference_layer(r, spec)) for name in opts.reference_layers})
    return builders


def _model_builders(opts: RunOptions, spec: BenchSpec) -> dict[str, Callable[[], nn.Module]]:
    builders: dict[str, Callable[[], nn.Module]] = {
        OURS_PREFIX + mode: (lambda m=mode: build_our_model(m, spec)) for mode in opts.modes
    }
    builders.update({name: (lambda r=name: build_reference_model(r, spec)) for name in opts.reference_models})
    return builders


def bench_attention(opts: RunOptions, spec: BenchSpec, log: Log = print) -> list[dict]:
    """Section ``attention``: one layer, forward + backward of (B, n, hidden) inputs."""

    return _fwd_bwd_section("attention", _attention_builders(opts, spec), _layer_step_maker(opts, spec), opts,
                            spec, 1, log)


def _layer_step_maker(opts: RunOptions, spec: BenchSpec) -> Callable[[nn.Module, int], StepFn]:
    """Steps of one attention layer: forward + backward of fixed random (B, n, hidden) inputs."""

    def make_step(layer: nn.Module, n: int) -> StepFn:
        gen = torch.Generator().manual_seed(opts.seed + n)
        x = torch.randn(opts.batch, n, spec.hidden_size, generator=gen).to(spec.dtype).requires_grad_()
        grad = torch.randn(opts.batch, n, spec.hidden_size, generator=gen).to(spec.dtype)

        def step() -> None:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(grad)

        return step

    return make_step


LINEAR_MODES = ("local", "lowrank", "lowrank_softmax", "local_unfused", "lowrank_unfused")


def bench_scaling(opts: RunOptions, spec: BenchSpec, log: Log = print) -> list[dict]:
    """Section ``scaling``: the attention layers of the linear modes at *every* length, all interleaved in
    the same rounds, so that time growth with n is not confounded by the machine's load changing
    between the per-length groups of the ``attention`` section."""
    make_step = _layer_step_maker(opts, spec)
    steps: dict[str, StepFn] = {}
    cases: dict[str, tuple[str, int, nn.Module]] = {}
    rows: list[dict] = []
    for mode in (m for m in opts.modes if m in LINEAR_MODES):
        case = OURS_PREFIX + mode
        try:
            layer = build_our_layer(mode, spec).train()
            for n in opts.seq_lens:
                key = f"{case}@{n}"
                steps[key], cases[key] = make_step(layer, n), (case, n, layer)
        except Exception as exc:  # noqa: BLE001
            rows.append(make_row("scaling", case, status="error", note=f"{type(exc).__name__}: {exc}"))
    times = time_interleaved(steps, opts.repeats, warmup=opts.warmup, budget_s=opts.time_budget_s)
    for key, timings in times.items():
        case, n, layer = cases[key]
        rows.append(make_row("scaling", case, seq_len=n, batch=opts.batch, implementation=_implementation(layer),
                             **_timing_fields(timings)))
        log(f"  scaling n={n:>6} {case:<16} {rows[-1]['time_s'] * 1e3:10.1f} ms")
    return rows


def bench_kernel(opts: RunOptions, spec: BenchSpec, log: Log = print) -> list[dict]:
    """Section ``kernel``: the attention math alone (no projections), forward + backward of (B, H, n, D)
    q, k, v, with the mode's mask built inside the step. ``rope`` is left out: its kernel is ``eager``'s."""

    def make_step(layer: nn.Module, n: int) -> StepFn:
        gen = torch.Generator().manual_seed(opts.seed + n)
        shape = (opts.batch, spec.num_heads, n, spec.head_dim)
        q, k, v = (torch.randn(shape, generator=gen).to(spec.dtype).requires_grad_() for _ in range(3))
        grad = torch.randn(shape, generator=gen).to(spec.dtype)

        def step() -> None:
            q.grad = k.grad = v.grad = None
            out = layer.kernel(q, k, v)  # (B, H, n, D) or (B, n, H, D): same numel
            out.backward(grad.view(out.shape))

        return step

    builders = {case: build for case, build in _attention_builders(opts, spec).items() if case != OURS_PREFIX + "rope"}
    return _fwd_bwd_section("kernel", builders, make_step, opts, spec, 1, log)


def _case_attention_kind(case: str) -> str:
    return base_mode(case[len(OURS_PREFIX):]) if case.startswith(OURS_PREFIX) else REFERENCE_ATTENTION_KIND[case]


def _flops_per_token(case: str, model: nn.Module, n: int, spec: BenchSpec) -> float:
    context = attention_context(_case_attention_kind(case), n, spec.window, spec.rank)
    return training_flops_per_token(matmul_param_count(model), spec.num_layers, spec.hidden_size, context)


def _lm_step(model: nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> StepFn:
    """Forward + backward of the next-token loss (+ an optimizer step when given)."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        if optimizer is not None:
            optimizer.step()

    return step


def _random_ids(batch: int, n: int, spec: BenchSpec, seed: int) -> torch.Tensor:
    return torch.randint(0, spec.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


def bench_model(opts: RunOptions, spec: BenchSpec, log: Log = print) -> list[dict]:
    """Section ``model``: whole model, forward + backward of the LM loss on (B, n) random tokens."""

    def make_step(model: nn.Module, n: int) -> StepFn:
        return _lm_step(model, _random_ids(opts.batch, n, spec, opts.seed + n))

    def extra(case: str, model: nn.Module, n: int, seconds: float) -> dict:
        tokens_per_s = opts.batch * n / seconds
        flops = _flops_per_token(case, model, n, spec)
        return {"tokens_per_s": tokens_per_s, "flops_per_token": flops}

    return _fwd_bwd_section("model", _model_builders(opts, spec), make_step, opts, spec, spec.num_layers, log, extra)


@torch.no_grad()
def cache_bytes_curve(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> list[tuple[int, int]]:
    """Greedy decoding by hand: ``(tokens generated, bytes the returned cache holds)`` after the prompt and
    after every step, read from the cache each forward returns (``cache`` from transformers 5.24,
    ``past_key_values`` before)."""
    name = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
    out = model(input_ids=prompt, use_cache=True)
    curve = [(0, cache_nbytes(getattr(out, name)))]
    for i in range(1, new_tokens + 1):
        token = out.logits[:, -1:].argmax(-1)  # (B, 1)
        out = model(input_ids=token, **{name: getattr(out, name)}, use_cache=True)
        curve.append((i, cache_nbytes(getattr(out, name))))
    return curve


def bench_generation(opts: RunOptions, spec: BenchSpec, log: Log = print) -> list[dict]:
    """Section ``generation``: greedy generate() tokens/s and cache bytes against generated length."""
    rows: list[dict] = []
    models: dict[str, nn.Module] = {}
    # position tables sized to what generation needs, as a model trained for that length would have
    spec = dataclasses.replace(spec, max_positions=opts.gen_prompt + opts.gen_tokens)
    for case, build in _model_builders(opts, spec).items():
        try:
            torch.manual_seed(opts.seed)
            models[case] = build().eval()
        except Exception as exc:  # noqa: BLE001
            rows.append(make_row("generation", case, status="error", note=f"build failed: {type(exc).__name__}: {exc}"))
    prompt = _random_ids(1, opts.gen_prompt, spec, opts.seed)
    total = opts.gen_prompt + opts.gen_tokens
    steps: dict[str, StepFn] = {}
    final_bytes: dict[str, int] = {}
    for case, model in models.items():
        try:
            curve = cache_bytes_curve(model, prompt, opts.gen_tokens)
        except Exception as exc:  # noqa: BLE001
            rows.append(make_row("generation", case, seq_len=total, status="error", note=f"{type(exc).__name__}: {exc}"))
            continue
        for generated, nbytes in curve:
            if generated % opts.cache_stride == 0 or generated == opts.gen_tokens:
                rows.append(make_row("generation_cache", case, seq_len=opts.gen_prompt + generated, batch=1,
                                     gen_len=generated, kv_cache_bytes=nbytes, implementation=_implementation(model)))
        final_bytes[case] = curve[-1][1]
        steps[case] = (lambda m=model: m.generate(prompt, max_new_tokens=opts.gen_tokens,
                                                  min_new_tokens=opts.gen_tokens, do_sample=False, pad_token_id=0))
    times = time_interleaved(steps, opts.repeats, warmup=opts.warmup, budget_s=opts.time_budget_s)
    for case, case_times in times.items():
        row = make_row("generation", case, seq_len=total, batch=1, gen_len=opts.gen_tokens,
                       kv_cache_bytes=final_bytes[case], implementation=_implementation(models[case]),
                       **_timing_fields(case_times))
        row["tokens_per_s"] = opts.gen_tokens / row["time_s"]
        rows.append(row)
        log(f"  generation {case:<16} {row['tokens_per_s']:8.1f} tok/s  cache {final_bytes[case] / 2**20:8.2f} MiB")
    return rows


def bench_train(opts: RunOptions, spec: BenchSpec, log: Log = print) -> list[dict]:
    """Section ``train``: forward + backward + AdamW step at ``train_seq_len``: tokens/s and MFU."""
    rows: list[dict] = []
    n, batch = opts.train_seq_len, opts.train_batch
    # position tables sized to the training length: a larger table would add optimizer work to
    # absolute-position models (ours eager, GPT-2) that a model trained at this length does not have
    spec = dataclasses.replace(spec, max_positions=n)
    ids = _random_ids(batch, n, spec, opts.seed)
    models: dict[str, nn.Module] = {}
    steps: dict[str, StepFn] = {}
    for case, build in _model_builders(opts, spec).items():
        try:
            torch.manual_seed(opts.seed)
            model = build().train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            steps[case] = _lm_step(model, ids, optimizer)
            steps[case]()  # first step allocates the optimizer state outside the measurements
            models[case] = model
        except Exception as exc:  # noqa: BLE001
            steps.pop(case, None)
            rows.append(make_row("train", case, seq_len=n, batch=batch, status="error",
                                 note=f"{type(exc).__name__}: {exc}"))
    peaks = {case: peak_memory_bytes(step) for case, step in steps.items()}
    times = time_interleaved(steps, opts.repeats, warmup=opts.warmup, budget_s=opts.time_budget_s)
    for case, case_times in times.items():
        timing = _timing_fields(case_times)
        tokens_per_s = batch * n / timing["time_s"]
        flops = _flops_per_token(case, models[case], n, spec)
        rows.append(make_row("train", case, seq_len=n, batch=batch, peak_mem_bytes=peaks[case],
                             implementation=_implementation(models[case]), tokens_per_s=tokens_per_s,
                             flops_per_token=flops, **timing))
        log(f"  train n={n} b={batch} {case:<16} {tokens_per_s:9.1f} tok/s")
    return rows


SMALL_REFERENCE = "refgpt_sdpa"
TORCH_OPS_SUFFIX = "_torch_ops"  # small cases run with HF_ATTN_CPU_KERNELS=0
TORCH_OPS_NOTE = "HF_ATTN_CPU_KERNELS=0: RMSNorm, SwiGLU and rotation as PyTorch ops (hf_attn 0.5's path)"


def small_builders(small: SmallSpec) -> dict[str, tuple[Callable[[], nn.Module], str]]:
    """Cases of the ``small`` section: case -> (builder, note on what the case is)."""
    ref = RefGPTConfig(vocab_size=small.vocab_size, block_size=small.block_size, num_layers=small.num_layers,
                       num_heads=small.num_heads, hidden_size=small.hidden_size)
    c, i = small.hidden_size, small.intermediate_size
    mlp = (f"SwiGLU I={i} (a multiple of 8): 3*C*I = {3 * c * i:,} MLP weights/layer vs the reference's "
           f"4x GELU 2*C*4C = {8 * c * c:,}")
    # the reference's own architecture in hf_attn: what remains of the gap is hf_attn's overhead
    gpt = dict(norm_type="layernorm", mlp_type="plain", hidden_act="gelu", intermediate_size=4 * c,
               rms_norm_eps=1e-5)
    gpt_note = ("the reference's architecture (norm_type='layernorm', mlp_type='plain', hidden_act='gelu', "
                f"I=4C={4 * c})")
    return {
        SMALL_REFERENCE: (lambda: RefGPT(ref),
                          "minimal GPT (reference_gpt): LayerNorm, fused qkv, sdpa is_causal, 4x GELU MLP, "
                          "learned positions, tied embeddings"),
        OURS_PREFIX + "eager": (lambda: build_small_model("eager", small), f"{mlp}; learned positions"),
        OURS_PREFIX + "eager_parity": (
            lambda: build_small_model("eager", small, intermediate_size=small.parity_intermediate_size),
            f"eager with SwiGLU I={small.parity_intermediate_size} (3*C*I = "
            f"{3 * c * small.parity_intermediate_size:,}: the reference's MLP weights exactly, an odd width), "
            "to show what the odd width costs"),
        OURS_PREFIX + "rope": (lambda: build_small_model("rope", small), f"{mlp}; rotary (no position table)"),
        OURS_PREFIX + "eager_gpt": (lambda: build_small_model("eager", small, **gpt), f"{gpt_note}; learned positions"),
        OURS_PREFIX + "rope_gpt": (lambda: build_small_model("rope", small, **gpt), f"{gpt_note}; rotary"),
        # the same models on the PyTorch ops (HF_ATTN_CPU_KERNELS=0 while they run): what the kernels save
        OURS_PREFIX + "eager" + TORCH_OPS_SUFFIX: (lambda: build_small_model("eager", small),
                                                   f"{mlp}; learned positions; {TORCH_OPS_NOTE}"),
        OURS_PREFIX + "rope" + TORCH_OPS_SUFFIX: (lambda: build_small_model("rope", small),
                                                  f"{mlp}; rotary; {TORCH_OPS_NOTE}"),
        OURS_PREFIX + "local": (lambda: build_small_model("local", small, sliding_window=small.window),
                                f"{mlp}; sliding_window={small.window} < n={small.block_size}"),
        OURS_PREFIX + "local_full": (lambda: build_small_model("local", small, sliding_window=small.block_size),
                                     f"{mlp}; sliding_window={small.block_size} >= n: plain causal attention"),
        OURS_PREFIX + "lowrank": (lambda: build_small_model("lowrank", small),
                                  f"{mlp}; default lowrank config (k, chunk, feature map)"),
    }


def _small_step(case: str, model: nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepFn:
    """One training step: forward, backward of the next-token loss, AdamW step.

    Ours is called as the project's trainer calls it (``labels=ids, use_cache=False``; the loss shifts
    the labels); the reference gets the same targets already shifted (the last position ignored), so
    both compute the same loss over the same logits. ``*_torch_ops`` cases step with
    ``HF_ATTN_CPU_KERNELS=0``.
    """
    if case.endswith(TORCH_OPS_SUFFIX):
        return _without_cpu_kernels(_lm_step(model, ids, optimizer))
    if case != SMALL_REFERENCE:
        return _lm_step(model, ids, optimizer)
    targets = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), -100)], dim=1)  # (B, n)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(ids, targets)[1].backward()
        optimizer.step()

    return step


def _without_cpu_kernels(step: StepFn) -> StepFn:
    def run() -> None:
        with switched("0"):
            step()

    return run


def bench_small(opts: RunOptions, log: Log = print) -> list[dict]:
    """Section ``small``: training steps (forward + backward + AdamW) at the baby-GPT size of
    ``opts.small``, every case interleaved in the same rounds, on ``opts.small.threads`` threads."""
    small = opts.small
    rows: list[dict] = []
    n, batch = small.block_size, small.batch
    ids = torch.randint(0, small.vocab_size, (batch, n), generator=torch.Generator().manual_seed(opts.seed))
    steps: dict[str, StepFn] = {}
    models: dict[str, nn.Module] = {}
    notes: dict[str, str] = {}
    builders = small_builders(small)
    runs = [(case, case, False) for case in builders]
    runs += [(case + "_compiled", case, True) for case in opts.small_compiled]
    with torch_threads(small.threads):
        for name, case, compiled in runs:
            build, note = builders[case]
            try:
                torch.manual_seed(opts.seed)
                model = build().train()
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                runner = torch.compile(model, fullgraph=True, backend=opts.compile_backend) if compiled else model
                step = _small_step(case, runner, ids, optimizer)
                if compiled:  # warmed up until no call compiles a new graph (the compile section's rule)
                    seconds, _, graphs = _warm_compiled(step, opts.warmup + 1)
                    note = (f"torch.compile(fullgraph=True, backend={opts.compile_backend!r}), {graphs} graph(s) "
                            f"compiled in {seconds:.0f} s (excluded); {note}")
                else:
                    for _ in range(max(1, opts.warmup)):  # the first step allocates the optimizer state
                        step()
                steps[name], models[name], notes[name] = step, model, note
            except Exception as exc:  # noqa: BLE001
                rows.append(make_row("small", name, seq_len=n, batch=batch, status="error",
                                     note=f"{type(exc).__name__}: {exc}"))
        peaks = {case: peak_memory_bytes(step) for case, step in steps.items()}
        times = time_interleaved(steps, opts.repeats, warmup=0, budget_s=opts.time_budget_s,
                                 max_repeats=max(50, opts.repeats))
    for case, case_times in times.items():
        timing = _timing_fields(case_times)
        params = sum(p.numel() for p in models[case].parameters())  # a tied weight once
        rows.append(make_row("small", case, seq_len=n, batch=batch, peak_mem_bytes=peaks[case],
                             implementation=_implementation(models[case]) or "sdpa",
                             tokens_per_s=batch * n / timing["time_s"], params=params,
                             note=f"{small.threads} thread(s); {notes[case]}", **timing))
        log(f"  small n={n} b={batch} {case:<16} {timing['time_s'] * 1e3:8.2f} ms  {params:,} parameters")
    return rows


def _compile_builder(case: str, spec: BenchSpec) -> Callable[[], nn.Module]:
    if case.startswith(OURS_PREFIX):
        return lambda: build_our_model(case[len(OURS_PREFIX):], spec)
    return lambda: build_reference_model(case, spec)


def _warm_compiled(step: StepFn, calls: int) -> tuple[float, int, int]:
    """Call a compiled ``step`` until it stops compiling: the first call, then more while a call still
    (re)compiles a graph (dynamo's ``unique_graphs`` counter grows), at least ``calls`` calls in all. Returns
    (compile seconds = the warm-up wall time minus as many steady calls, calls made, graphs compiled)."""
    from torch._dynamo.utils import counters

    def compiled_frames() -> int:
        return counters["stats"]["unique_graphs"]

    walls: list[float] = []
    start = compiled_frames()
    for i in range(50):
        before = compiled_frames()
        walls.append(time_call(step).wall)
        if i + 1 >= max(calls, 2) and compiled_frames() == before:
            break
    steady = walls[-1]
    return max(0.0, sum(walls) - steady * len(walls)), len(walls), compiled_frames() - start


def bench_compile(opts: RunOptions, spec: BenchSpec, log: Log = print) -> list[dict]:
    """Section ``compile``: ``torch.compile(model, fullgraph=True)`` against the same model uncompiled.

    Rows of section ``compile_train``: training steps (forward, backward of the LM loss, AdamW; the model
    compiled, the optimizer not) at ``compile_train_seq_len`` x ``compile_train_batch``, tokens/s, for
    ``compile_train_cases``. Rows of ``compile_decode``: greedy ``generate()`` with
    ``cache_implementation="static"``, tokens/s of ``compile_gen_tokens`` new tokens after a
    ``compile_gen_prompt``-token prompt, compiled through ``CompileConfig(fullgraph=True)`` (the decode
    step compiled, the prefill not) or uncompiled (``disable_compile``), for ``compile_gen_cases``.
    Compiled and uncompiled copies hold the same initial weights. The compiled ones are warmed up until
    no call compiles a new graph; the compile seconds (warm-up time beyond steady calls) are reported in
    ``compile_s``, not in the timings. All cases of a part are timed in the same interleaved rounds.
    """
    from transformers import CompileConfig

    backend = opts.compile_backend
    rows: list[dict] = []
    torch._dynamo.reset()
    # --- training
    n, batch = opts.compile_train_seq_len, opts.compile_train_batch
    tspec = dataclasses.replace(spec, max_positions=n)
    ids = _random_ids(batch, n, tspec, opts.seed)
    steps: dict[str, StepFn] = {}
    meta: dict[str, tuple[str, bool, nn.Module]] = {}
    compile_s: dict[str, float] = {}
    frames: dict[str, int] = {}
    for case in opts.compile_train_cases:
        for compiled in (False, True):
            key = f"{case}:{'compiled' if compiled else 'uncompiled'}"
            try:
                torch.manual_seed(opts.seed)
                model = _compile_builder(case, tspec)().train()
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                runner = torch.compile(model, fullgraph=True, backend=backend) if compiled else model
                step = _lm_step(runner, ids, optimizer)
                if compiled:
                    compile_s[key], calls, frames[key] = _warm_compiled(step, opts.warmup + 1)
                    log(f"  compile_train {case:<14} compiled in {compile_s[key]:7.1f} s ({calls} warm-up calls, "
                        f"{frames[key]} graph(s) compiled)")
                else:
                    for _ in range(max(1, opts.warmup)):  # the first step allocates the optimizer state
                        step()
                steps[key], meta[key] = step, (case, compiled, model)
            except Exception as exc:  # noqa: BLE001 - a broken case is reported, the run goes on
                rows.append(make_row("compile_train", case, seq_len=n, batch=batch, compiled=compiled,
                                     status="error", note=f"{type(exc).__name__}: {exc}"[:500]))
                log(f"  compile_train {key}: error {rows[-1]['note']}")
    times = time_interleaved(steps, opts.repeats, warmup=0, budget_s=opts.time_budget_s)
    for key, case_times in times.items():
        case, compiled, model = meta[key]
        timing = _timing_fields(case_times)
        rows.append(make_row("compile_train", case, seq_len=n, batch=batch, implementation=_implementation(model),
                             tokens_per_s=batch * n / timing["time_s"], compiled=compiled,
                             compile_s=compile_s.get(key), note=f"backend={backend}; {frames[key]} graph(s) compiled" if compiled else None,
                             **timing))
        log(f"  compile_train n={n} b={batch} {key:<24} {rows[-1]['tokens_per_s']:9.1f} tok/s")
    del steps, meta
    gc.collect()
    # --- static-cache decoding
    prompt_len, new = opts.compile_gen_prompt, opts.compile_gen_tokens
    gspec = dataclasses.replace(spec, max_positions=prompt_len + new)
    prompt = _random_ids(1, prompt_len, gspec, opts.seed)
    config = CompileConfig(fullgraph=True, mode="default", backend=backend)
    config._compile_all_devices = True  # generate() compiles only on accelerators unless told
    steps, meta, compile_s, frames = {}, {}, {}, {}
    for case in opts.compile_gen_cases:
        for compiled in (False, True):
            key = f"{case}:{'compiled' if compiled else 'uncompiled'}"
            try:
                torch.manual_seed(opts.seed)
                model = _compile_builder(case, gspec)().eval()
                kwargs = {"compile_config": config} if compiled else {"disable_compile": True}

                def step(m: nn.Module = model, kw: dict = kwargs) -> None:
                    m.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                               cache_implementation="static", **kw)

                if compiled:
                    compile_s[key], calls, frames[key] = _warm_compiled(step, opts.warmup + 1)
                    log(f"  compile_decode {case:<14} compiled in {compile_s[key]:7.1f} s ({calls} warm-up calls, "
                        f"{frames[key]} graph(s) compiled)")
                else:
                    for _ in range(opts.warmup):
                        step()
                steps[key], meta[key] = step, (case, compiled, model)
            except Exception as exc:  # noqa: BLE001
                rows.append(make_row("compile_decode", case, seq_len=prompt_len + new, batch=1, gen_len=new,
                                     compiled=compiled, status="error", note=f"{type(exc).__name__}: {exc}"[:500]))
                log(f"  compile_decode {key}: error {rows[-1]['note']}")
    times = time_interleaved(steps, opts.repeats, warmup=0, budget_s=opts.time_budget_s)
    for key, case_times in times.items():
        case, compiled, model = meta[key]
        timing = _timing_fields(case_times)
        rows.append(make_row("compile_decode", case, seq_len=prompt_len + new, batch=1, gen_len=new,
                             implementation=_implementation(model), tokens_per_s=new / timing["time_s"],
                             compiled=compiled, compile_s=compile_s.get(key),
                             note=(f"backend={backend}; static cache; {frames[key]} graph(s) compiled" if compiled
                                   else "static cache"), **timing))
        log(f"  compile_decode {key:<24} {rows[-1]['tokens_per_s']:9.1f} tok/s")
    return rows


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return list(value) if isinstance(value, tuple) else value


def environment_info(opts: RunOptions, spec: BenchSpec, peak_flops: float) -> dict:
    """Device, software and settings of this run (written next to the results and printed)."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "device": f"cpu ({cpu})",
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "dtype": str(spec.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_kernels": describe_cpu_kernels(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "matmul_peak_flops": peak_flops,
        "matmul_peak_size": opts.peak_matmul_size,
        "spec": {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v) for k, v in vars(spec).items()},
        "options": {k: _jsonable(v) for k, v in vars(opts).items()},
        "memory_method": "peak live bytes of torch's CPU allocator during one step (torch.profiler memory events)",
        "timing_method": (f"median of interleaved repeats (at least {opts.repeats}, more while a group's timed "
                          f"rounds fit in {opts.time_budget_s:g} s, at most 50) after {opts.warmup} warm-up "
                          "call(s) and one profiled (memory) call"),
    }


def run_suite(opts: RunOptions, spec: BenchSpec, log: Log = print,
              checkpoint: Callable[[list[dict], dict], None] | None = None) -> tuple[list[dict], dict]:
    """Run the selected sections; return (rows, environment info).

    ``checkpoint(rows, env)``, when given, is called after every section with the rows so far, so a
    long run that dies late still leaves its finished sections behind.
    """
    opts.validate()
    spec.validate()
    log(f"measuring the {opts.peak_matmul_size}^2 matmul peak ...")
    peak_flops = matmul_peak_flops(opts.peak_matmul_size, dtype=spec.dtype)
    env = environment_info(opts, spec, peak_flops)
    log(f"device {env['device']}, {env['threads']} threads, {env['dtype']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, matmul peak {peak_flops / 1e9:.1f} GFLOP/s; fused CPU kernels: "
        f"{env['cpu_kernels']}")
    rows: list[dict] = []
    sections: dict[str, Callable[[], list[dict]]] = {
        "attention": lambda: bench_attention(opts, spec, log),
        "kernel": lambda: bench_kernel(opts, spec, log),
        "scaling": lambda: bench_scaling(opts, spec, log),
        "model": lambda: bench_model(opts, spec, log),
        "generation": lambda: bench_generation(opts, spec, log),
        "train": lambda: bench_train(opts, spec, log),
        "small": lambda: bench_small(opts, log),
        "compile": lambda: bench_compile(opts, spec, log),
    }
    with frozen_heap():
        for name in opts.sections:
            log(f"[{name}]")
            rows.extend(sections[name]())
            gc.collect()
            if checkpoint is not None:
                checkpoint(rows, env)
    # The peak is measured again at the end and the best of both kept: on a shared machine a single
    # measurement taken under load understates the peak and so overstates every MFU.
    peak_flops = max(peak_flops, matmul_peak_flops(opts.peak_matmul_size, dtype=spec.dtype))
    env["matmul_peak_flops"] = peak_flops
    for row in rows:
        if row["flops_per_token"] is not None and row["tokens_per_s"] is not None:
            row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / peak_flops
    env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return rows, env
