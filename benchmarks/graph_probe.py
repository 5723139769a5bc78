"""Probe: eager vs CUDA-graph-replayed penalized steps (GraphedStep), with a gradient check. GPU only."""
import json
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import qgrad.models
from qgrad.cuda_graph import GraphedStep
from qgrad.penalties import L1GradPenalty

DEVICE = torch.device("cuda")
BATCH = 128


def setup(name, mode, dtype, layout):
    torch.manual_seed(0)
    model = qgrad.models.get(name, num_classes=10, width=1.0, in_channels=3).to(DEVICE).train()
    model = model.to(memory_format=layout)
    penalty = None
    if mode == "exact":
        penalty = L1GradPenalty(model, 0.05, 0.05)
    elif mode == "worst_case":
        penalty = L1GradPenalty(model, 0.05, 0.05, method="worst-case")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def loss_of(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16", cache_enabled=False):
            return F.cross_entropy(model(x), y)

    def fn(x, y):
        loss = loss_of(x, y)
        if penalty is None:
            loss.backward()
            return {"loss": loss.detach()}
        return penalty.backward(loss, (lambda: loss_of(x, y)) if mode == "worst_case" else None, sync=False)

    return model, opt, fn


def batch(layout, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(BATCH, 3, 32, 32, generator=g).to(DEVICE).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (BATCH,), generator=g).to(DEVICE)
    return x, y


def times(step, n=20, warm=4):
    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(out)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def grads(model):
    return [p.grad.detach().clone() if p.grad is not None else None for p in model.parameters()]


def rel(a, b):
    num = sum(float((x - y).float().norm() ** 2) for x, y in zip(a, b) if x is not None)
    den = sum(float(x.float().norm() ** 2) for x in a if x is not None)
    return (num / max(den, 1e-30)) ** 0.5


def case(name, mode, dtype, layout_name):
    layout = torch.channels_last if layout_name == "channels_last" else torch.contiguous_format
    model, opt, fn = setup(name, mode, dtype, layout)
    x, y = batch(layout, 1)
    # eager step time
    def eager():
        opt.zero_grad(set_to_none=True)
        fn(x, y)
        opt.step()

    eager_ms = times(eager)
    torch.cuda.reset_peak_memory_stats()
    eager()
    torch.cuda.synchronize()
    eager_mem = torch.cuda.max_memory_allocated() / 2**20
    # graph: capture, then check one replay against an eager call from the same state
    step = GraphedStep(fn, model.parameters(), warmup=3)
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        step(x, y)
    assert step.captured
    s0 = state(model)
    x2, y2 = batch(layout, 2)
    opt.zero_grad(set_to_none=True)
    ref_out = {k: float(v) for k, v in fn(x2, y2).items()}
    ref = grads(model)
    ref_state = state(model)
    model.load_state_dict(s0)
    opt.zero_grad(set_to_none=True)
    out = {k: float(v) for k, v in step(x2, y2).items()}
    got = grads(model)
    got_state = state(model)
    err = rel(ref, got)
    buf_err = max(float((ref_state[k].float() - got_state[k].float()).abs().max()) for k in ref_state)
    out_err = max(abs(ref_out[k] - out[k]) / max(abs(ref_out[k]), 1e-12) for k in ref_out)

    def graphed():
        opt.zero_grad(set_to_none=True)
        step(x, y)
        opt.step()

    graph_ms = times(graphed)
    torch.cuda.reset_peak_memory_stats()
    graphed()
    torch.cuda.synchronize()
    graph_mem = torch.cuda.max_memory_allocated() / 2**20
    return dict(model=name, mode=mode, dtype=dtype, layout=layout_name, eager_ms=eager_ms, graph_ms=graph_ms,
                grad_rel_err=err, state_max_abs_err=buf_err, stats_rel_err=out_err, eager_peak_mb=eager_mem,
                graph_peak_mb=graph_mem)


def main():
    out_path = sys.argv[1]
    layouts = sys.argv[2:] or ["contiguous"]
    rows = []
    for layout in layouts:
        for name in ["resnet18", "vgg_like"]:
            for dtype in ["float32", "bfloat16"]:
                for mode in ["plain", "exact", "worst_case"]:
                    try:
                        r = case(name, mode, dtype, layout)
                    except Exception as e:  # noqa: BLE001 -- a probe: report and go on
                        tb = traceback.format_exc().splitlines()
                        r = dict(model=name, mode=mode, dtype=dtype, layout=layout, error=f"{type(e).__name__}: {e}",
                                 where=tb[-8:])
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                    torch.cuda.empty_cache()
    json.dump(rows, open(out_path, "w"), indent=1)
    print("\nmodel     mode        dtype     layout         eager ms  graph ms   x plain(eager/graph)  grad err")
    plain = {(r["model"], r["dtype"], r["layout"]): r for r in rows if r["mode"] == "plain" and "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"{r['model']:9s} {r['mode']:11s} {r['dtype']:9s} {r['layout']:14s} ERROR {r['error'][:150]}")
            continue
        p = plain.get((r["model"], r["dtype"], r["layout"]))
        ratio = f"{r['eager_ms'] / p['eager_ms']:.2f} / {r['graph_ms'] / p['graph_ms']:.2f}" if p else "-"
        print(f"{r['model']:9s} {r['mode']:11s} {r['dtype']:9s} {r['layout']:14s} {r['eager_ms']:8.2f} "
              f"{r['graph_ms']:8.2f}   {ratio:20s} {r['grad_rel_err']:.1e}")


if __name__ == "__main__":
    main()
