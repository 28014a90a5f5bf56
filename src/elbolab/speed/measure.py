"""How the benchmark measures: throughput over alternating repeats, peak memory, FLOPs, the machine's peak.

Timings on a shared or busy machine are noisy, so every measurement is a set of
repeats, and the repeats of the libraries being compared are interleaved (A, B, A,
B, ...) so that both see the same background load. We report the best repeat (the
least disturbed) and the median.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so that the next
    row's RSS delta counts its own allocations rather than reusing an earlier row's."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: deltas are then upper-bounded by reuse
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory above the level at entry: CUDA max allocated on a GPU, else sampled RSS.

    RSS is sampled every ``interval`` seconds on a thread, so a spike shorter than
    that can be missed; with the MB-sized tensors of these models it is not.
    """

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device = device
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        release_free_memory()
        self._base = current_rss()
        self._peak = self._base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, current_rss())
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, current_rss())
        self.peak_bytes = self._peak - self._base


#: the clock every timing reads: wall time, or this process's CPU time (``use_cpu_clock``)
_clock: Callable[[], float] = time.perf_counter


def use_cpu_clock(enabled: bool) -> None:
    """Time with the process's CPU time instead of the wall clock.

    On a machine shared with other jobs, wall time mostly measures the waiting; with one
    thread, CPU time measures the work (not cache interference from neighbours). Spinning
    OpenMP threads inflate CPU time, so use it with ``--threads 1``; CPU only.
    """
    global _clock
    _clock = time.process_time if enabled else time.perf_counter


def clock_name() -> str:
    """Which clock timings read now: "cpu" or "wall"."""
    return "cpu" if _clock is time.process_time else "wall"


def now() -> float:
    """The clock every timing reads, read now."""
    return _clock()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: below this CPU share (process CPU seconds / (wall seconds x threads)) a repeat ran on a busy
#: machine: on 2 busy cores, 2-thread steps measured 30x below the same steps on a quiet machine
BUSY_SHARE = 0.5


@dataclass
class Throughput:
    """Items per second of every repeat; ``best`` is the least disturbed one."""

    per_repeat: list[float] = field(default_factory=list)
    #: per repeat on a CPU: process CPU seconds / (wall seconds x torch threads); near 1 (or
    #: above, spinning threads) on a quiet machine, far below when the threads waited for cores
    cpu_share: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return max(self.per_repeat) if self.per_repeat else float("nan")

    @property
    def best_cpu_share(self) -> float | None:
        """The CPU share of the repeat ``best`` reports (None on a GPU)."""
        if not self.cpu_share:
            return None
        return self.cpu_share[self.per_repeat.index(self.best)]

    @property
    def median(self) -> float:
        return statistics.median(self.per_repeat) if self.per_repeat else float("nan")


def busy_note(cpu_share: float | None, threads: int) -> str:
    """A warning for a wall-clock timing whose process got too little CPU, else ""."""
    if cpu_share is None or cpu_share >= BUSY_SHARE:
        return ""
    return (f"BUSY MACHINE: ran {100 * cpu_share:.0f}% of the wall time its {threads} thread"
            f"{'s' if threads > 1 else ''} asked for, so img/s is far too low; rerun on a quiet machine "
            "or with --threads 1 --clock cpu")


def calibrate(step: Callable[[], None], device: torch.device, target_s: float, max_calls: int = 10_000) -> int:
    """How many calls of ``step`` make one repeat last about ``target_s`` (at least 1)."""
    synchronize(device)
    t0 = _clock()
    step()
    synchronize(device)
    dt = max(_clock() - t0, 1e-6)
    return int(min(max_calls, max(1, round(target_s / dt))))


def time_calls(step: Callable[[], None], calls: int, device: torch.device) -> float:
    """Seconds for ``calls`` back-to-back calls of ``step`` (device work included)."""
    synchronize(device)
    t0 = _clock()
    for _ in range(calls):
        step()
    synchronize(device)
    return _clock() - t0


def compare(
    steps: dict[str, tuple[Callable[[], None], int]],
    device: torch.device,
    repeats: int,
    target_s: float,
    warmup: int = 2,
) -> dict[str, tuple[Throughput, int]]:
    """Time several ``name -> (step, items per call)`` side by side, interleaving their repeats.

    With ``target_s <= 0`` each repeat is a single call (for long runs such as a whole
    test set). Peak memory is the largest seen over the warm-up and the first repeat.
    Returns ``name -> (throughput in items/s, peak memory bytes)``.
    """
    calls: dict[str, int] = {}
    peaks: dict[str, int] = {}
    for name, (step, _) in steps.items():
        with PeakMemory(device) as mem:
            for _ in range(warmup):
                step()
            calls[name] = calibrate(step, device, target_s) if target_s > 0 else 1
        peaks[name] = mem.peak_bytes
    out = {name: Throughput() for name in steps}
    threads = torch.get_num_threads()
    for r in range(repeats):
        for name, (step, items) in steps.items():
            with PeakMemory(device) if r == 0 else contextlib.nullcontext() as mem:
                wall0, cpu0 = time.perf_counter(), time.process_time()
                seconds = time_calls(step, calls[name], device)
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            if r == 0:
                peaks[name] = max(peaks[name], mem.peak_bytes)
            out[name].per_repeat.append(items * calls[name] / seconds)
            if device.type == "cpu":
                out[name].cpu_share.append(cpu / max(wall * threads, 1e-9))
    return {name: (out[name], peaks[name]) for name in steps}


def count_flops(fn: Callable[[], None]) -> int:
    """Floating-point operations of one call, as torch's FLOP counter sees them.

    It counts matrix products (forward and backward: the GEMMs that dominate these
    models), not elementwise work, so achieved/peak is a GEMM-efficiency ratio.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_step(device: torch.device, n: int = 1024, dtype: torch.dtype = torch.float32
                ) -> tuple[Callable[[], None], int]:
    """A large matrix product and its FLOP count, to time beside a row (``compare``) so
    that the row's achieved/peak ratio sees the same background load as the row."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=c)), 2 * n**3


def matmul_peak_flops(device: torch.device, n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32
                      ) -> float:
    """Best observed FLOP/s of an ``n x n`` matrix product: the practical peak of this machine."""
    step, flops = matmul_step(device, n, dtype)
    step()
    best = 0.0
    for _ in range(repeats):
        best = max(best, flops / time_calls(step, 1, device))
    return best


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on, including the load the machine was under."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = [round(v, 2) for v in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
