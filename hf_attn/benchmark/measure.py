"""Timing and peak-memory primitives of the benchmark suite.

Timing: wall clock (``time.perf_counter``) around one call of a step function; callers run several
cases *interleaved* (case A, B, C, A, B, C, ...), so that the noise of a shared machine hits every
case alike, and report the median of the repeats, warm-up calls excluded.

Peak memory: ``torch`` has no CPU memory statistics, and the RSS of the process is blurred by the
allocator keeping freed pages. We therefore replay the CPU allocator's own bookkeeping:
``torch.profiler`` with ``profile_memory=True`` records one ``[memory]`` event per allocation and per
free made by torch's CPU allocator while it runs (tensors, autograd buffers, gradients; not memory
that BLAS/oneDNN libraries allocate for themselves). The running sum of those events in time order is
the number of bytes the step holds above what existed before it started; its maximum is the step's
peak. Frees of blocks allocated before the profiler started are not reported, so the figure is an
upper bound of the true peak increase, never an underestimate. The profiled call is a separate run
from the timed ones (profiling slows a step down), so it never enters a timing.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile

StepFn = Callable[[], object]


class Timing(NamedTuple):
    """One timed call: wall-clock seconds and CPU seconds of this process (all its threads)."""

    wall: float
    cpu: float


def time_call(fn: StepFn) -> Timing:
    """Time one call of ``fn`` with the cyclic garbage collector paused.

    The CPU time (``time.process_time``) is recorded next to the wall clock because on a shared
    machine it is far less sensitive to other processes: wall time is what a user waits, CPU time is
    the work done (plus any spin-waiting of idle threads).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return Timing(time.perf_counter() - wall, time.process_time() - cpu)
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Move every object alive now out of the garbage collector's sight (``gc.freeze``) for the block.

    Importing transformers leaves millions of objects; without this, each full ``gc.collect()``
    between measurements costs ~0.5 s.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return float(statistics.median(values))


def time_interleaved(
    fns: dict[str, StepFn], repeats: int, warmup: int = 1, budget_s: float = 0.0, max_repeats: int = 50
) -> dict[str, list[Timing]]:
    """Time every function in interleaved rounds, after ``warmup`` untimed calls each.

    At least ``repeats`` rounds run; then more, up to ``max_repeats``, while one more round still fits
    in ``budget_s`` seconds of timed rounds: fast cases get many repeats (a stable median on a noisy
    machine), slow ones the minimum. The order of the cases rotates by one every round, so that no
    case always runs first (right after the garbage collector or a cold cache) or always last.

    Returns:
        name -> list of timings (one per round), in the order they were taken.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} is invalid: expected an integer >= 1")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[Timing]] = {name: [] for name in names}
    rounds, elapsed = 0, 0.0
    while names and (rounds < repeats or (rounds < max_repeats and elapsed * (rounds + 1) / rounds <= budget_s)):
        gc.collect(1)  # young garbage of the previous round; the collector is paused inside timed calls
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_call(fns[name]))
            elapsed += times[name][-1].wall
        rounds += 1
    return times


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the C++ profiler's start/stop log lines, which go straight to file descriptor 2."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest capture or an embedded interpreter
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def peak_memory_bytes(fn: StepFn) -> int:
    """Peak bytes the CPU allocator holds during one call of ``fn``, above the state before the call.

    See the module docstring for what is and is not counted. The result of ``fn`` is dropped inside
    the profiled region, so a step that returns a large tensor is charged for it.
    """
    gc.collect()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return peak_of_allocations([(e.start_ns(), e.nbytes()) for e in events])


def peak_of_allocations(events: list[tuple[int, int]]) -> int:
    """Maximum running sum of ``(timestamp, signed bytes)`` allocation events taken in time order."""
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):  # sorted() is stable: equal stamps keep order
        live += nbytes
        peak = max(peak, live)
    return peak


def matmul_peak_flops(size: int = 4096, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """The machine's measured matmul peak: best FLOP/s of ``repeats`` (size x size) @ (size x size) products.

    The best (not the median) is the right statistic for a *peak*: noise on a shared machine only
    ever slows a run down.
    """
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool, BLAS packing buffers
    best = min(time_call(lambda: torch.mm(a, b)).wall for _ in range(repeats))
    return 2.0 * size**3 / best
