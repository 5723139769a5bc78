"""Helpers shared by the benchmark files: wall clock after warm-up (callers synchronize devices), copy bandwidth,
the Triton version for the results."""
import statistics
import time

import torch


def wall_times(fn, repeats, warmup=2):
    """Seconds taken by each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_ms(fn, repeats=9, warmup=2):
    """Median milliseconds of ``fn`` over ``repeats`` timed calls."""
    return 1e3 * statistics.median(wall_times(fn, repeats, warmup))


_COPY_GBPS = {}


def copy_gbps(numel, device="cpu", timer=median_ms):
    """Measured bandwidth in GB/s of ``y.copy_(x)`` (read + write) on float32 tensors of ``numel`` elements.

    ``timer(fn) -> milliseconds``: e.g. ``triton.testing.do_bench`` on a GPU.
    """
    key = (numel, str(device))
    if key not in _COPY_GBPS:
        x = torch.randn(numel, device=device)
        y = torch.empty_like(x)
        _COPY_GBPS[key] = 2 * numel * x.element_size() / (timer(lambda: y.copy_(x)) * 1e-3) / 1e9
    return _COPY_GBPS[key]


def triton_version():
    """The installed Triton's version, or None without Triton (recorded in each result's ``extra_info``)."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__
