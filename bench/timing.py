"""Timers. Each returns a list of per-call times in milliseconds; callers pool the
samples of several interleaved rounds and take the median."""
import os
import statistics
import time

import torch


def cpu_samples_ms(fn, min_run_time):
    from torch.utils.benchmark import Timer

    # Timer defaults to num_threads=1; the kernels under test are multi-threaded.
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return [t * 1e3 for t in measurement.times]


# glibc's largest dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit).
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20


def settle_cpu_allocator():
    """Puts glibc malloc in the state a training process reaches after its first
    step, before anything is timed. glibc serves large blocks with mmap until a
    freed mmapped block raises its threshold (up to 32 MB), and returns the heap's
    top to the OS above twice that. Until the first large free, and whenever a step
    frees more than the trim threshold at once, every fresh output page-faults
    again; which cases hit that depended on what ran before them in the process,
    so one kernel's step time in a 6.4-25.7 MB case swung 1.8x between runs.
    Freeing one block of the threshold's maximum, as any real network does with
    its activations, settles both thresholds for the whole run, for every
    implementation alike. No-op off glibc. Returns a description for the report."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        return "system allocator (not glibc): left as is"
    # A chunk just under the maximum: glibc only raises the threshold to sizes
    # up to it, and adds its own header to the request.
    # Left untouched: glibc raises the thresholds when it unmaps the block.
    block = torch.empty(GLIBC_MMAP_THRESHOLD_MAX - (1 << 16), dtype=torch.uint8)
    del block
    return (f"glibc {version} malloc, defaults; its dynamic mmap threshold settled at "
            f"~32 MB by freeing one 32 MB block first, as after a training step")


def cpu_memory_bandwidth_gbps(nbytes=256 << 20, repeats=7):
    """DRAM bandwidth as the timed kernels see it, with the run's threads: a read
    (sum) and a copy (read + write bytes) of a buffer far larger than the L3,
    medians of `repeats`. The shared VM's bandwidth moves about 2x over hours,
    and the memory-bound cases move with it, so every run records it."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)

    def median_s(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    read_s = median_s(lambda: src.sum())
    copy_s = median_s(lambda: dst.copy_(src))
    del src, dst
    return {"read": nbytes / read_s / 1e9, "copy": 2 * nbytes / copy_s / 1e9, "bytes": nbytes}


def _triton_do_bench():
    try:
        from triton.testing import do_bench
    except Exception:  # triton missing or broken: fall back to CUDA events
        return None
    return do_bench


class _L2Flusher:
    """Overwrites a buffer larger than L2 before each timed call, as
    triton.testing.do_bench does, so each call reads its inputs from DRAM."""

    def __init__(self, device):
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
        self.buffer = torch.empty(max(4 * l2_bytes, 256 << 20), dtype=torch.int8, device=device)

    def __call__(self):
        self.buffer.zero_()


_flushers = {}


def _events_samples_ms(fn, device, warmup_ms, rep_ms):
    flush = _flushers.setdefault(str(device), _L2Flusher(device))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    # Estimate the per-call time to turn the time budgets into call counts.
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(5):
        flush()
        fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    n_repeat = max(10, int(rep_ms / estimate_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    for s, e in zip(starts, ends):
        flush()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def cuda_samples_ms(fn, device, warmup_ms=25, rep_ms=100):
    do_bench = _triton_do_bench()
    if do_bench is None:
        return _events_samples_ms(fn, device, warmup_ms, rep_ms), "cuda-events"
    with torch.cuda.device(device):
        try:
            return list(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")), "triton.do_bench"
        except (AssertionError, ValueError, TypeError):
            # Older triton has no return_mode="all": one median per round instead.
            return [float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))], \
                "triton.do_bench"


def cuda_timer_name():
    return "triton.testing.do_bench" if _triton_do_bench() is not None else "CUDA events + L2 flush"


def copy_bandwidth_gbps(device, nbytes=None):
    """Device-to-device copy bandwidth: (bytes read + bytes written) / median time."""
    props = torch.cuda.get_device_properties(device)
    l2_bytes = getattr(props, "L2_cache_size", 0) or 64 << 20
    nbytes = nbytes or max(16 * l2_bytes, 1 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    samples, _ = cuda_samples_ms(lambda: dst.copy_(src), device, rep_ms=200)
    median_ms = statistics.median(samples)
    del src, dst
    return 2 * nbytes / (median_ms * 1e-3) / 1e9, nbytes


def summarize_samples(samples):
    """Median and interquartile range (ms) of pooled samples."""
    if not samples:
        return float("nan"), float("nan")
    median = statistics.median(samples)
    if len(samples) >= 4:
        q = statistics.quantiles(samples, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = max(samples) - min(samples)
    return median, iqr


class CpuContention:
    """Measures how much CPU time *other* processes used while we timed.

    On a 2-core machine one busy foreign process wrecks OpenMP timings: a parallel
    region waits a whole scheduler time slice for its preempted thread, turning a
    0.1 ms kernel into 10+ ms. Each timed block is therefore checked, and redone
    after the machine has gone quiet when others used more than `threshold` of it.
    """

    def __init__(self, threshold=0.10, max_attempts=4, quiet_wait_s=20.0, total_wait_budget_s=360.0):
        self.threshold = threshold
        self.max_attempts = max_attempts
        self.quiet_wait_s = quiet_wait_s
        self.wait_budget_s = total_wait_budget_s
        self.available = os.path.exists("/proc/stat")
        self.retries = 0
        self.waited_s = 0.0

    @staticmethod
    def _snapshot():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal: busy (incl. stolen) ticks.
        busy_ticks = sum(fields[:3]) + sum(fields[5:8])
        own = os.times()
        return time.perf_counter(), busy_ticks, own.user + own.system

    def foreign_fraction(self, before, after):
        """Share of the machine's CPU capacity used by other processes in between."""
        wall = after[0] - before[0]
        busy_s = (after[1] - before[1]) / os.sysconf("SC_CLK_TCK")
        own_s = after[2] - before[2]
        capacity = wall * (os.cpu_count() or 1)
        return max(0.0, busy_s - own_s) / capacity if capacity > 0 else 0.0

    def _wait_until_quiet(self):
        deadline = time.perf_counter() + min(self.quiet_wait_s, self.wait_budget_s - self.waited_s)
        start = time.perf_counter()
        while time.perf_counter() < deadline:
            before = self._snapshot()
            time.sleep(0.5)
            if self.foreign_fraction(before, self._snapshot()) < self.threshold / 2:
                break
        self.waited_s += time.perf_counter() - start

    def measure(self, sample_fn):
        """Runs sample_fn() (returning samples) until it runs without contention;
        returns (samples, foreign CPU fraction) of the least contended attempt."""
        if not self.available:
            return sample_fn(), None
        best = None
        for attempt in range(self.max_attempts):
            before = self._snapshot()
            samples = sample_fn()
            foreign = self.foreign_fraction(before, self._snapshot())
            if best is None or foreign < best[1]:
                best = (samples, foreign)
            if foreign <= self.threshold or attempt == self.max_attempts - 1:
                break
            self.retries += 1
            if self.waited_s < self.wait_budget_s:
                self._wait_until_quiet()
        return best
