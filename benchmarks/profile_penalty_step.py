"""Profile of a penalized training step: the top operators by self CPU time, as Markdown tables.

Runs, for one model, a plain step, the exact gradient-l1 penalty written with plain PyTorch (autograd double
backward through torch's BatchNorm and convolution; the ``exact_autograd`` baseline of
``test_penalty_step.py``), and ``L1GradPenalty``'s exact path (weights + activations, lambda 0.05), each
under ``torch.profiler`` for ``--steps`` steps after warm-up steps, and prints per mode the wall time per
step (synchronized, median) and the ``--top`` operators by self CPU time (per step) with their call counts;
with ``--device cuda`` also the GPU busy time (the sum of kernel and copy times), their number, and the top
kernels: a step whose wall time is far above its GPU busy time is bound by the host (Python, autograd, kernel
launches). Single-threaded by default (``--threads``): on a shared machine, per-op CPU times of one thread are
far less disturbed by other processes than wall times of several.

    python benchmarks/profile_penalty_step.py --model resnet18 --width 0.25 --batch 32
    python benchmarks/profile_penalty_step.py --device cuda --width 1 --batch 128 --modes exact_qgrad
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import qgrad.models
from qgrad.malloc import keep_freed_memory
from qgrad.penalties import L1GradPenalty

LAMBDA = 0.05


def _autograd_penalty(model):
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    acts = []

    def record(module, args):
        if torch.is_grad_enabled() and args[0].requires_grad and all(a is not args[0] for a in acts):
            acts.append(args[0])

    for layer in layers:
        layer.register_forward_pre_hook(record)

    def backward(loss):
        grads = torch.autograd.grad(loss, [m.weight for m in layers] + acts, create_graph=True)
        (loss + LAMBDA * sum(torch.linalg.vector_norm(g, 1) for g in grads)).backward()
        acts.clear()

    return backward


def _step_fn(mode, args, device):
    torch.manual_seed(0)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    model = qgrad.models.get(args.model, width=args.width).to(device).train().to(memory_format=layout)
    x = torch.randn(args.batch, 3, 32, 32, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def loss_fn():
        return F.cross_entropy(model(x), y)

    if mode == "plain":
        backward = torch.Tensor.backward
    elif mode == "exact_autograd":
        backward = _autograd_penalty(model)
    else:
        kwargs = {"worst_case": {"method": "worst-case"}, "every4": {"every": 4}}.get(mode, {})
        penalty = L1GradPenalty(model, weight=LAMBDA, activation=LAMBDA, **kwargs)
        backward = lambda loss: penalty.backward(loss, loss_fn)  # noqa: E731

    def step():
        # every4: one penalized and three plain steps, reported per step
        for _ in range(4 if mode == "every4" else 1):
            model.zero_grad(set_to_none=True)
            backward(loss_fn())

    return step, (4 if mode == "every4" else 1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=qgrad.models.names())
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--channels-last", action="store_true", help="model and input in channels-last layout")
    parser.add_argument("--modes", nargs="+", default=["plain", "exact_autograd", "exact_qgrad"],
                        choices=["plain", "exact_autograd", "exact_qgrad", "every4", "worst_case"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:  # as the step benchmark and the qgrad command line: no page faults on every new tensor
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if cuda else f"{args.threads} thread(s)"
    layout = ", channels-last" if args.channels_last else ""
    print(f"torch {torch.__version__}, {args.model}{layout} width {args.width}, batch {args.batch}, {where}, "
          f"{args.steps} profiled steps; times are per step\n")
    totals = {}
    for mode in ["plain"] + [m for m in args.modes if m != "plain"]:
        step, per = _step_fn(mode, args, device)
        for _ in range(3):
            step()
        _sync(device)
        walls = []
        for _ in range(max(args.steps, 10)):
            t0 = time.perf_counter()
            step()
            _sync(device)
            walls.append(time.perf_counter() - t0)
        wall = 1e3 * statistics.median(walls) / per
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            _sync(device)
        events = prof.key_averages()
        steps = args.steps * per
        cpu_total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
        line = f"### {mode}: {wall:.1f} ms wall per step (median of {len(walls)}), {cpu_total:.1f} ms self CPU"
        tables = [("self CPU", [e for e in events if e.self_cpu_time_total > 0], "self_cpu_time_total")]
        if cuda:
            # kernels only: an operator's self device time is the time of the kernels it launched, which
            # are listed (and would be counted) again as events of their own
            kernels = [e for e in events if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
            gpu_total = sum(e.self_device_time_total for e in kernels) / steps / 1e3
            launches = sum(e.count for e in kernels) / steps
            line += f", {gpu_total:.1f} ms of GPU kernels in {launches:.0f} kernels/copies"
            tables.insert(0, ("GPU", kernels, "self_device_time_total"))
        totals[mode] = wall
        print(f"{line} ({wall / totals['plain']:.2f}x plain wall)\n")
        for label, ranked, by in tables:
            total = sum(getattr(e, by) for e in ranked) / steps / 1e3
            print(f"| {'kernel' if label == 'GPU' else 'operator'} | {label} ms/step | % | calls/step |")
            print("| --- | ---: | ---: | ---: |")
            for e in sorted(ranked, key=lambda e: -getattr(e, by))[: args.top]:
                ms = getattr(e, by) / steps / 1e3
                print(f"| `{e.key[:80]}` | {ms:.2f} | {100 * ms / total:.1f} | {e.count / steps:.0f} |")
            print()


if __name__ == "__main__":
    sys.exit(main())
