"""Timing and peak-memory measurement of one callable, on the CPU or on a CUDA device.

Times: median of repeated calls after warm-up; CUDA calls are timed with CUDA events and synchronised.
Peak extra memory: bytes allocated by the call above what was allocated before it, at its peak.
  - CUDA: torch.cuda.max_memory_allocated (the caching allocator's exact figure).
  - CPU: the PyTorch profiler's allocation events (profile_memory=True) carry the CPU allocator's running
    total, so the peak over one call is exact for tensors; memory a kernel takes outside the tensor
    allocator (std::vector scratch, OpenMP stacks) is not counted.
The memory figure comes from the last warm-up call, so profiling never touches the timed calls.
"""
from __future__ import annotations

import statistics
import time
import tracemalloc
from dataclasses import dataclass, field

import torch


@dataclass
class Policy:
    """How many times to call: enough for a stable median, bounded in time for slow calls."""

    budget_s: float = 0.5  # stop repeating once this much time has been spent (and min_reps are done)
    min_reps: int = 5
    max_reps: int = 30
    slow_call_s: float = 0.5  # a call slower than this is timed slow_reps times only
    slow_reps: int = 2
    very_slow_call_s: float = 2.0  # a call slower than this is timed once: the first call is the sample
    # A quick call gets three warm-up calls (first calls pay for lazy initialisation) and is repeated,
    # untimed, right before each timed sample: implementations are sampled in turns, and without it a
    # millisecond call would always be timed cold, just after another implementation's work has evicted
    # its code and data.
    quick_call_s: float = 0.05


@dataclass
class Measurement:
    median_s: float
    min_s: float
    reps: int
    warmup: int
    peak_extra_bytes: int | None
    samples_s: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "median_ms": self.median_s * 1e3,
            "min_ms": self.min_s * 1e3,
            "reps": self.reps,
            "warmup": self.warmup,
            "peak_extra_bytes": self.peak_extra_bytes,
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_peak_extra_bytes(fn) -> int | None:
    """Peak bytes the call allocates through PyTorch's CPU allocator, above what it held before."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # private profiler API moved: report no figure rather than a wrong one
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = 0
    baseline = None
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    allocations = []
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size,
                                event.extra_fields.total_allocated))
        stack.extend(event.children)
    allocations.sort()
    for _, size, total in allocations:
        if baseline is None:
            baseline = total - size  # what was held when the window opened
        peak = max(peak, total - baseline)
    return peak


def cuda_peak_extra_bytes(fn, device: torch.device) -> int:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def python_heap_peak_bytes(fn) -> int:
    """Peak of the Python heap (numpy arrays included: numpy reports to tracemalloc) during the call."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class Timer:
    """Warm-up, memory and timed samples of one callable; several Timers are sampled in turns."""

    def __init__(self, fn, device: torch.device, policy: Policy, *, setup=None, memory: bool = True,
                 python_heap: bool = False, memory_when_slow: bool = False):
        self.fn, self.device, self.policy = fn, device, policy
        self.setup = setup or (lambda: None)
        self.memory, self.python_heap, self.memory_when_slow = memory, python_heap, memory_when_slow
        self.samples: list[float] = []
        self.warmup = 0
        self.peak = None
        self.reps_cap = policy.max_reps
        self.rewarm = False

    def _wall_once(self) -> float:
        self.setup()
        synchronize(self.device)
        start = time.perf_counter()
        self.fn()
        synchronize(self.device)
        return time.perf_counter() - start

    def warm_up(self) -> None:
        """One call (three if calls are quick: first calls pay for lazy initialisation), then the memory call."""
        first = self._wall_once()
        self.warmup = 1
        if first > self.policy.very_slow_call_s:
            # Sampled: at this cost one-time effects are noise; the first call is the sample, and no memory
            # figure unless asked for (it costs another call).
            self.samples, self.reps_cap, self.warmup = [first], 1, 0
            self.memory = self.memory and self.memory_when_slow
            self._measure_memory()
            return
        if first > self.policy.slow_call_s:
            self.reps_cap = self.policy.slow_reps
        self.rewarm = first <= self.policy.quick_call_s
        while self.rewarm and self.warmup < 3:
            self._wall_once()
            self.warmup += 1
        self._measure_memory()

    def _measure_memory(self) -> None:
        if self.memory:
            self.setup()
            if self.device.type == "cuda":
                self.peak = cuda_peak_extra_bytes(self.fn, self.device)
            else:
                self.peak = cpu_peak_extra_bytes(self.fn)
                if self.python_heap and self.peak is not None:
                    self.setup()
                    self.peak += python_heap_peak_bytes(self.fn)
                    self.warmup += 1
            self.warmup += 1

    def wants_more(self) -> bool:
        if len(self.samples) >= self.reps_cap:
            return False
        return len(self.samples) < min(self.policy.min_reps, self.reps_cap) or sum(self.samples) < self.policy.budget_s

    def sample(self) -> None:
        if self.rewarm:
            self._wall_once()
        if self.device.type != "cuda":
            self.samples.append(self._wall_once())
            return
        self.setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.fn()
        end.record()
        end.synchronize()
        self.samples.append(start.elapsed_time(end) / 1e3)

    def result(self) -> Measurement:
        return Measurement(statistics.median(self.samples), min(self.samples), len(self.samples), self.warmup,
                           self.peak, list(self.samples))


def measure_interleaved(timers: dict) -> dict:
    """Sample several Timers in turns (A, B, C, A, B, C, ...), so that load from other processes on a shared
    machine falls on all of them alike and their ratios stay fair. Returns {name: Measurement}."""
    for timer in timers.values():
        timer.warm_up()
    while any(timer.wants_more() for timer in timers.values()):
        for timer in timers.values():
            if timer.wants_more():
                timer.sample()
    return {name: timer.result() for name, timer in timers.items()}


def measure(fn, device: torch.device, policy: Policy, **options) -> Measurement:
    """Time `fn()` alone; options as for Timer (setup, memory, python_heap)."""
    return measure_interleaved({"fn": Timer(fn, device, policy, **options)})["fn"]


def copy_bandwidth(device: torch.device, megabytes: int = 512, reps: int = 10) -> float:
    """Bytes per second of a large tensor copy_ (read + write counted), the device's practical ceiling."""
    numel = megabytes * 2**20 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    measurement = measure(lambda: dst.copy_(src), device, Policy(budget_s=1.0, min_reps=reps, max_reps=reps),
                          memory=False)
    return 2 * src.numel() * src.element_size() / measurement.median_s
