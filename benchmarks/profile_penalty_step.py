"""Profile of a penalized training step: the top operators by self CPU time, as Markdown tables.

Runs, for one model, a plain step, the exact gradient-l1 penalty written with plain PyTorch (autograd double
backward through torch's BatchNorm and convolution; the ``exact_autograd`` baseline of
``test_penalty_step.py``), and ``L1GradPenalty``'s exact path (weights + activations, lambda 0.05), each
under ``torch.profiler`` for ``--steps`` steps after two warm-up steps, and prints per mode the ``--top``
operators by self CPU time (per step) with their call counts. Single-threaded by default (``--threads``):
on a shared machine, per-op CPU times of one thread are far less disturbed by other processes than wall
times of several.

    python benchmarks/profile_penalty_step.py --model resnet18 --width 0.25 --batch 32
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import qgrad.models
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=qgrad.models.names())
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.model} width {args.width}, batch {args.batch}, "
          f"{args.threads} thread(s), {args.steps} profiled steps; times are per step\n")
    totals = {}
    for mode in ("plain", "exact_autograd", "exact_qgrad"):
        torch.manual_seed(0)
        model = qgrad.models.get(args.model, width=args.width).train()
        x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
        if mode == "plain":
            backward = torch.Tensor.backward
        elif mode == "exact_autograd":
            backward = _autograd_penalty(model)
        else:
            backward = L1GradPenalty(model, weight=LAMBDA, activation=LAMBDA).backward

        def step(model=model, backward=backward, x=x, y=y):
            model.zero_grad(set_to_none=True)
            backward(F.cross_entropy(model(x), y))

        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
        totals[mode] = total
        print(f"### {mode}: {total:.0f} ms self CPU per step ({total / totals['plain']:.2f}x plain)\n")
        print("| operator | self CPU ms/step | % | calls/step |")
        print("| --- | ---: | ---: | ---: |")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            ms = e.self_cpu_time_total / args.steps / 1e3
            print(f"| `{e.key}` | {ms:.1f} | {100 * ms / total:.1f} | {e.count / args.steps:.0f} |")
        print()


if __name__ == "__main__":
    sys.exit(main())
