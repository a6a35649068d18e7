"""Operator-level profiles, to find where a mode is slow.

``python scripts/benchmark.py --profile 4096 --modes local,lowrank`` writes
``profile_<case>_n<N>.txt`` per case: torch.profiler's operator table of one attention layer
(forward + backward) sorted by self CPU time, with input shapes, so a slow op can be traced back to a
line of the attention code.

``python scripts/benchmark.py --profile-small`` does the same for whole training steps of the
``small`` section (baby GPT, one thread): ``profile_small_<case>.txt`` per case (operator table with
shapes, and the Python functions of the step by cProfile) and ``profile_small_vs_reference.txt``,
each case's per-operator self time and call count next to the reference GPT's, per step.
"""

from __future__ import annotations

import cProfile
import pstats
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .measure import _quiet_stderr, torch_threads
from .ours import build_our_layer
from .reference import build_reference_layer
from .spec import BenchSpec, SmallSpec


def profile_layer(case: str, n: int, spec: BenchSpec, batch: int = 1, rows: int = 25) -> str:
    """Operator table (self CPU time, shapes, memory) of one forward + backward of layer ``case`` at length n.

    ``case`` is ``ours_<mode>`` or a reference layer name.
    """
    layer = build_our_layer(case[5:], spec) if case.startswith("ours_") else build_reference_layer(case, spec)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(batch, n, spec.hidden_size, generator=gen).to(spec.dtype).requires_grad_()
    grad = torch.randn(batch, n, spec.hidden_size, generator=gen).to(spec.dtype)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)

    step()  # warm-up
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True) as prof:
        step()
    total_ms = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
    header = f"# {case}, n={n}, batch={batch}, {spec}\n# total self CPU time {total_ms:.1f} ms\n"
    table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                                 max_name_column_width=60, max_shapes_column_width=90)
    return header + table


def write_profiles(out_dir: Path, cases: list[str], n: int, spec: BenchSpec) -> list[Path]:
    """``profile_<case>_n<n>.txt`` for every case, in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in cases:
        paths.append(out_dir / f"profile_{case}_n{n}.txt")
        paths[-1].write_text(profile_layer(case, n, spec), encoding="utf-8")
    return paths


# cProfile paths are shown relative to the repository (or to site-packages)
_REPOSITORY = str(Path(__file__).resolve().parents[2]) + "/"


def _op_totals(prof) -> dict[str, tuple[float, float]]:
    """operator -> (calls, self CPU microseconds) in one profile."""
    return {e.key: (e.count, e.self_cpu_time_total) for e in prof.key_averages()}


def python_table(python: cProfile.Profile, rows: int = 30, steps: int = 1) -> str:
    """cProfile's functions by own time, in microseconds per step (of ``steps`` profiled). A Python
    frame's own time includes the tensor operators written as expressions in it (``a * b`` is no
    separate call to cProfile)."""
    entries = sorted(pstats.Stats(python).stats.items(), key=lambda kv: kv[1][2], reverse=True)
    lines = [f"{'own us':>9} {'cum us':>9} {'calls':>6}  function (per step)"]
    for (path, line, name), (_, calls, own, cumulative, _) in entries[:rows]:
        path = path.split("site-packages/")[-1].removeprefix(_REPOSITORY)
        lines.append(f"{own * 1e6 / steps:9.0f} {cumulative * 1e6 / steps:9.0f} {calls / steps:6.0f}  "
                     + (name if path == "~" else f"{path}:{line}({name})"))
    return "\n".join(lines)


def op_difference_table(reference: dict, ours: dict, name: str, rows: int = 25, cheaper: int = 6) -> str:
    """Operators ranked by how much more self time per step ``ours`` spends than ``reference`` (the
    ``rows`` largest excesses, then the ``cheaper`` operators where ours spends least relative to it)."""
    def diff(key: str) -> float:
        return ours.get(key, (0, 0))[1] - reference.get(key, (0, 0))[1]

    keys = sorted(set(reference) | set(ours), key=diff, reverse=True)
    lines = [f"## {name} - reference, per step (self CPU us; profiler overhead included)",
             f"{'operator':62} {'calls ref':>9} {'calls ours':>10} {'us ref':>9} {'us ours':>9} {'us diff':>9}"]
    for key in keys[:rows] + ["..."] + keys[-cheaper:]:
        if key == "...":
            lines.append("...")
            continue
        (c_ref, t_ref), (c_ours, t_ours) = reference.get(key, (0, 0)), ours.get(key, (0, 0))
        lines.append(f"{key[:62]:62} {c_ref:9.0f} {c_ours:10.0f} {t_ref:9.0f} {t_ours:9.0f} {t_ours - t_ref:9.0f}")
    total_ref, total_ours = (sum(t for _, t in d.values()) for d in (reference, ours))
    lines.append(f"{'all operators':62} {'':9} {'':10} {total_ref:9.0f} {total_ours:9.0f} {total_ours - total_ref:9.0f}")
    return "\n".join(lines)


def write_small_profiles(out_dir: Path, small: SmallSpec, steps: int = 5, rows: int = 30) -> list[Path]:
    """Profile training steps (forward, backward, AdamW) of every case of the ``small`` section.

    The cases are profiled one step each in ``steps`` interleaved rounds (load changes hit them
    alike), after three unprofiled steps. Writes ``profile_small_<case>.txt`` (operators of the last
    round by self CPU time with input shapes; then ``steps`` more steps under cProfile, its Python
    functions per step) and ``profile_small_vs_reference.txt`` (``op_difference_table`` of every
    case, averaged over the rounds).
    """
    from .suite import SMALL_REFERENCE, _small_step, small_builders

    out_dir.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, small.vocab_size, (small.batch, small.block_size), generator=torch.Generator().manual_seed(0))
    texts: dict[str, str] = {}
    totals: dict[str, dict[str, tuple[float, float]]] = {}
    with torch_threads(small.threads):
        steps_by_case = {}
        for case, (build, _) in small_builders(small).items():
            torch.manual_seed(0)
            model = build().train()
            steps_by_case[case] = _small_step(case, model, ids, torch.optim.AdamW(model.parameters(), lr=1e-4))
            for _ in range(3):  # optimizer state, allocator and kernel caches warm
                steps_by_case[case]()
        last = {}
        for _ in range(steps):
            for case, step in steps_by_case.items():
                with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    step()
                acc = totals.setdefault(case, {})
                for key, (calls, us) in _op_totals(prof).items():
                    c0, t0 = acc.get(key, (0, 0))
                    acc[key] = (c0 + calls / steps, t0 + us / steps)
                last[case] = prof
        for case, step in steps_by_case.items():
            python = cProfile.Profile()
            python.enable()
            for _ in range(steps):
                step()
            python.disable()
            table = last[case].key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60, max_shapes_column_width=90)
            per_step_ms = sum(t for _, t in totals[case].values()) / 1e3
            texts[case] = (f"# {case}: {small.batch} x {small.block_size} tokens, {small}\n"
                           f"# self CPU time {per_step_ms:.1f} ms per step (mean of {steps} profiled steps, "
                           "profiler overhead included); the table is the last profiled step\n" + table
                           + f"\n\n# Python functions per step ({steps} steps, not under torch.profiler), cProfile:\n"
                           + python_table(python, rows, steps) + "\n")
    paths = []
    for case, text in texts.items():
        paths.append(out_dir / f"profile_small_{case}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    diffs = [op_difference_table(totals[SMALL_REFERENCE], t, case) for case, t in totals.items() if case != SMALL_REFERENCE]
    paths.append(out_dir / "profile_small_vs_reference.txt")
    paths[-1].write_text(f"# small section, {small}; mean of {steps} interleaved profiled steps per case\n\n"
                         + "\n\n".join(diffs) + "\n", encoding="utf-8")
    return paths
