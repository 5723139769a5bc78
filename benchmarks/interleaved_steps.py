"""Step time per penalty mode relative to a plain step, measured in interleaved rounds.

On a shared or noisy machine the per-test ratios of ``test_penalty_step.py`` scatter: its plain steps are
timed before and after each mode, seconds apart, and a slow spell of the machine lands on one side. Here
every round runs one step of each mode back to back (plain first), each mode's ratio is taken to the plain
step *of the same round*, and the median over rounds is reported with its range. Models, sizes, modes and
the step itself are those of ``test_penalty_step.py`` (``_setup``), including ``QGRAD_BENCH_LAYOUT``; an
``every4`` step counts as 4 steps (one penalized, three plain) and is reported per step.

Clock: CPU time of the process with one thread (``--threads 1``, the steadiest measure on a shared CPU),
wall time otherwise; on CUDA, wall time with a synchronization after each step.

    python benchmarks/interleaved_steps.py --threads 1 --rounds 15 --json benchmarks/results/cpu_steps.json
    QGRAD_BENCH_LAYOUT=channels_last python benchmarks/interleaved_steps.py --models resnet18
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import test_penalty_step as bench
import torch
from _timing import triton_version

from qgrad.malloc import keep_freed_memory


def measure(models, modes, rounds, warmup, dtype, clock):
    """``{model: {mode: [seconds per step, one per round]}}`` with ``"plain"`` among the modes."""
    results = {}
    for name in models:
        order = ["plain"] + [m for m in modes if m != "plain"]
        steps = {mode: bench._setup(name, mode, dtype) for mode in order}
        for step, _ in steps.values():
            for _ in range(warmup):
                step()
        times = {mode: [] for mode in steps}
        for _ in range(rounds):
            for mode, (step, per) in steps.items():
                start = clock()
                step()
                times[mode].append((clock() - start) / per)
        results[name] = times
        del steps
    return results


def summarize(times):
    """Median, min and max over rounds of each mode's time and of its ratio to the same round's plain step."""
    plain = times["plain"]
    out = {}
    for mode, values in times.items():
        ratios = [v / p for v, p in zip(values, plain)]
        out[mode] = {
            "step_ms_median": 1e3 * statistics.median(values),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=bench.MODELS, choices=bench.MODELS)
    parser.add_argument("--modes", nargs="+", default=bench.MODES, choices=bench.MODES)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument(
        "--warmup", type=int, default=2,
        help="untimed steps of each mode before the rounds (with 0 the first round's steps run cold)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dtype", default="float32", choices=bench.DTYPES)
    parser.add_argument("--json", default=None, help="also write the summary and every round's times here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"--json: the folder of {args.json} does not exist")  # before minutes of measuring
    args.models = list(dict.fromkeys(args.models))  # a name given twice is measured once
    args.modes = list(dict.fromkeys(args.modes))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if bench.CUDA:
        def clock():
            torch.cuda.synchronize()
            return time.perf_counter()
        kind = "wall time, synchronized"
    elif torch.get_num_threads() == 1:
        keep_freed_memory()
        clock, kind = time.process_time, "process CPU time"
    else:
        keep_freed_memory()
        clock, kind = time.perf_counter, "wall time"
    cpu = f"cpu ({platform.processor() or platform.machine()})"
    env = {
        "device": torch.cuda.get_device_name() if bench.CUDA else cpu,
        "torch": torch.__version__,
        "triton": triton_version(),
        "threads": torch.get_num_threads(),
        "clock": kind,
        "layout": bench.LAYOUT,
        "width": bench.WIDTH,
        "batch": bench.BATCH,
        "dtype": args.dtype,
        "lam": bench.LAMBDA,
        "rounds": args.rounds,
    }
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    times = measure(args.models, args.modes, args.rounds, args.warmup, args.dtype, clock)
    summary = {name: summarize(t) for name, t in times.items()}
    print(f"\n| model | plain step | {' | '.join(m for m in args.modes if m != 'plain')} |")
    print("| --- | ---: |" + " ---: |" * len([m for m in args.modes if m != "plain"]))
    for name, modes in summary.items():
        cells = [
            f"{s['ratio_median']:.2f}x [{s['ratio_min']:.2f}, {s['ratio_max']:.2f}]"
            for mode, s in modes.items()
            if mode != "plain"
        ]
        print(f"| {name} | {modes['plain']['step_ms_median']:.1f} ms | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "summary": summary, "times_s": times}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
