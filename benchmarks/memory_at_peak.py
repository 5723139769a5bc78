"""What is alive at the memory peak of a training step, by the operator and autograd node that allocated it.

Runs one step of a mode of ``test_penalty_step.py`` (same models, sizes and step) under
``torch.profiler(profile_memory=True)`` after two warm-up steps, pairs the allocation and free events by
address, finds the moment the step's own allocations peak, and prints the memory still allocated then,
grouped by where it was allocated: the innermost autograd node (or, in the forward, the outermost operator)
and the innermost operator. The CPU allocator is what it sees by default; the peak it reports counts the
step's allocations only (not the model, its gradients or the optimizer state).

    python benchmarks/memory_at_peak.py --model resnet18 --mode exact_qgrad
"""
import argparse
import collections

import test_penalty_step as bench
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def allocations(prof):
    """``(time_ns, address, bytes, op stack)`` of every allocation (bytes > 0) and free (bytes < 0)."""
    out = []

    def walk(node, stack):
        kind, fields = node.typed
        if kind == _EventType.Allocation:
            out.append((node.start_time_ns, fields.ptr, fields.alloc_size, stack))
            return
        stack = stack + [node.name]
        for child in node.children:
            walk(child, stack)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, [])
    return sorted(out, key=lambda a: a[0])


def site(stack):
    """``(autograd node or outermost operator, innermost operator)`` of an allocation."""
    node = next((s for s in reversed(stack) if "Backward" in s), stack[0] if stack else "?")
    return node.replace("autograd::engine::evaluate_function: ", ""), stack[-1] if stack else "?"


def live_at_peak(events):
    """The step's peak in bytes, the allocation sites alive then (bytes each) and the stack at the peak."""
    live, current, peak, at_peak, where = {}, 0, 0, {}, []
    for _, ptr, size, stack in events:
        if size > 0:
            live[ptr] = (size, stack)
        elif ptr not in live:  # freed memory allocated before the profiled step: not the step's
            continue
        else:
            live.pop(ptr)
        current += size
        if current > peak:
            peak, at_peak, where = current, dict(live), stack
    sites = collections.Counter()
    for size, stack in at_peak.values():
        sites[site(stack)] += size
    return peak, sites, where


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(bench.DATA), default="resnet18")
    parser.add_argument("--mode", choices=["plain"] + bench.MODES, default="exact_qgrad")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    step, _ = bench._setup(args.model, args.mode, "float32")
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    peak, sites, where = live_at_peak(allocations(prof))
    node, op = site(where)
    print(f"{args.model}, {args.mode}: the step's allocations peak at {peak / 2**20:.1f} MB, in {node} ({op})")
    print("\n| allocated by | operator | MB alive at the peak |\n| --- | --- | ---: |")
    for (node, op), size in sites.most_common(args.top):
        print(f"| {node} | {op} | {size / 2**20:.2f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
