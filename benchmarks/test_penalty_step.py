"""Cost of a training step with the gradient-l1 penalty, per mode, relative to a plain step.

One step is ``zero_grad``, forward, backward (with the penalty), ``SGD.step`` on random data: CIFAR-sized
(32x32, 10 classes) for the VGG-like and the CIFAR ResNet-18, ImageNet-sized for ``resnet18_imagenet`` (224x224
with CUDA, 64x64 on a CPU; 1000 classes), the paper's three settings.
Modes (``lambda_w = lambda_y = 0.05``, BatchNorm in training mode):

* ``plain``: ``loss.backward()``;
* ``exact_autograd``: the exact penalty as a user would write it in plain PyTorch -- layer-input hooks,
  ``torch.autograd.grad(..., create_graph=True)``, ``vector_norm`` per tensor, autograd's double backward
  through torch's BatchNorm and convolution (what ``L1GradPenalty(fused_batchnorm=False, fused_conv=False)``
  runs, minus qgrad's fused l1 norms);
* ``exact_qgrad``: ``L1GradPenalty`` (fused BatchNorm and convolution double backward, fused l1 norms);
* ``exact_qgrad_weights``: the same on the weights only (``activation=0``);
* ``exact_qgrad_recompute``: ``exact_qgrad`` with ``recompute=model.recompute_segments()`` (the forward's
  saved tensors of every residual block / Conv-BN-ReLU unit dropped and recomputed when needed: less memory,
  more time);
* ``every4``: ``L1GradPenalty(every=4)``: the time of 4 consecutive steps (one penalized, three plain) / 4;
* ``worst_case``: ``L1GradPenalty(method="worst-case")`` (h = 1e-3).

With ``QGRAD_BENCH_GRAPH=1`` (CUDA only) the forward and backward of every mode, the plain step's too, run
as a replayed CUDA graph (:class:`qgrad.cuda_graph.GraphedStep`; the optimizer step stays eager), which
removes the host's cost of launching each kernel; ``every4`` then runs as two graphs, a penalized step with
4x the coefficients and three plain ones (what ``qgrad train --cuda-graph --every 4`` does), and its
``extra_info`` adds the time of each kind of step alone (``every4_penalized_step_s``,
``every4_plain_step_s``).

Sizes: on a CPU width 0.25, batch 32 (float32); with CUDA full width, batch 128, float32 and bfloat16
autocast. On a CPU the timing process keeps freed memory (:func:`qgrad.malloc.keep_freed_memory`, what the
``qgrad`` command line does): with glibc's defaults each step page-faults its tensors back in, which slowed
a plain step by 10-15% and the others by different amounts, depending on what ran before.
Each result's ``extra_info`` holds ``ratio_to_plain``: the median step time over the median of plain steps
measured in the same test right before and right after (so slow drifts of a shared machine cancel), and the
peak memory with its ratio to the plain step's:

* CUDA: ``torch.cuda.max_memory_allocated`` over the timed steps;
* CPU: PyTorch keeps no CPU allocator statistics (and ``tracemalloc`` does not see its allocations), so the
  peak is measured in a fresh subprocess per (model, mode): after one warm-up step, the high-water mark of
  the resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) over 3 steps minus the resident
  size before them (``peak_rss_mb``): what a step adds on top of the model, its gradients and the optimizer
  state, with glibc told to unmap every block of 128 KiB or more when it is freed, so that the resident size
  follows the live tensors (Linux only). Cross-checked against the allocation timeline of
  ``torch.profiler(profile_memory=True)``: 36 MB for a plain ResNet-18 step at width 0.25, batch 32.

    pytest benchmarks/test_penalty_step.py --benchmark-only
    QGRAD_BENCH_THREADS=1 pytest benchmarks/test_penalty_step.py --benchmark-only   # torch threads
    QGRAD_BENCH_LAYOUT=channels_last pytest benchmarks/test_penalty_step.py --benchmark-only  # model and data
    QGRAD_BENCH_GRAPH=1 pytest benchmarks/test_penalty_step.py --benchmark-only   # CUDA graphs (GraphedStep)
    python benchmarks/test_penalty_step.py --peak-rss resnet18 exact_qgrad    # one CPU memory measurement
"""
import contextlib
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _timing import triton_version, wall_times
from torch import nn

import qgrad.models
from qgrad.cuda_graph import GraphedStep
from qgrad.malloc import keep_freed_memory
from qgrad.penalties import L1GradPenalty

if os.environ.get("QGRAD_BENCH_THREADS"):  # e.g. 1 on a shared machine, where threads wait for each other
    torch.set_num_threads(int(os.environ["QGRAD_BENCH_THREADS"]))
CUDA = torch.cuda.is_available()
LAYOUT = os.environ.get("QGRAD_BENCH_LAYOUT", "contiguous")  # or channels_last, for the model and its input
if LAYOUT not in ("contiguous", "channels_last"):
    raise ValueError(f"QGRAD_BENCH_LAYOUT must be contiguous or channels_last, got {LAYOUT!r}")
FORMAT = torch.channels_last if LAYOUT == "channels_last" else torch.contiguous_format
GRAPH = os.environ.get("QGRAD_BENCH_GRAPH", "0") == "1"
if GRAPH and not torch.cuda.is_available():
    raise RuntimeError("QGRAD_BENCH_GRAPH=1 replays CUDA graphs and needs a CUDA device")
DEVICE = torch.device("cuda" if CUDA else "cpu")
WIDTH, BATCH = (1.0, 128) if CUDA else (0.25, 32)
MODELS = ["vgg_like", "resnet18", "resnet18_imagenet"]
# (input side, classes) per model
DATA = {"vgg_like": (32, 10), "resnet18": (32, 10), "resnet18_imagenet": (224 if CUDA else 64, 1000)}
MODES = [
    "exact_autograd", "exact_qgrad", "exact_qgrad_weights", "exact_qgrad_recompute", "every4", "worst_case"
]
DTYPES = ["float32", "bfloat16"] if CUDA else ["float32"]
LAMBDA = 0.05
# a GPU step takes milliseconds: more rounds, and warm-up for cuDNN's algorithm search and Triton's compiles
ROUNDS, WARMUP = (20, 3) if CUDA else (5, 1)
_PLAIN_RSS = {}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _autocast(dtype):
    if dtype == "bfloat16":
        # a graph would keep the weight casts autocast caches during the capture: no cache with graphs
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16, cache_enabled=not GRAPH)
    return torch.autocast(DEVICE.type, enabled=False)


class _AutogradPenalty:
    """The exact gradient-l1 penalty written with plain PyTorch ops (the baseline of this benchmark)."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.acts = []
        for layer in self.layers:
            layer.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        # a tensor read by two layers (a ResNet block input: conv1 and the shortcut) is one activation
        if torch.is_grad_enabled() and args[0].requires_grad and all(a is not args[0] for a in self.acts):
            self.acts.append(args[0])

    def backward(self, loss, closure=None):
        weights = [m.weight for m in self.layers]
        grads = torch.autograd.grad(loss, weights + self.acts, create_graph=True)
        reg = LAMBDA * sum(torch.linalg.vector_norm(g, 1) for g in grads)
        (loss + reg).backward()
        self.acts = []


def _setup(name, mode, dtype):
    torch.manual_seed(0)
    size, classes = DATA[name]
    model = qgrad.models.get(name, num_classes=classes, width=WIDTH, in_channels=3).to(DEVICE).train()
    model = model.to(memory_format=FORMAT)
    x = torch.randn(BATCH, 3, size, size, device=DEVICE).contiguous(memory_format=FORMAT)
    y = torch.randint(0, classes, (BATCH,), device=DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def loss_of(x, y):
        with _autocast(dtype):
            return F.cross_entropy(model(x), y)

    penalty = {
        "plain": lambda: None,
        "exact_autograd": lambda: _AutogradPenalty(model),
        "exact_qgrad": lambda: L1GradPenalty(model, weight=LAMBDA, activation=LAMBDA),
        "exact_qgrad_weights": lambda: L1GradPenalty(model, weight=LAMBDA, activation=0.0),
        "exact_qgrad_recompute": lambda: L1GradPenalty(
            model, weight=LAMBDA, activation=LAMBDA, recompute=model.recompute_segments()
        ),
        # with graphs, L1GradPenalty(every=4)'s steps come from two graphs (it picks each step's kind in
        # Python, which a replay cannot): 4x the coefficients on one step in 4, plain steps between
        "every4": lambda: (
            L1GradPenalty(model, weight=4 * LAMBDA, activation=4 * LAMBDA)
            if GRAPH
            else L1GradPenalty(model, weight=LAMBDA, activation=LAMBDA, every=4)
        ),
        "worst_case": lambda: L1GradPenalty(model, weight=LAMBDA, activation=LAMBDA, method="worst-case"),
    }[mode]()
    steps = 4 if mode == "every4" else 1

    def plain_backward(x, y):
        # the plain steps beside a penalized graph run torch's own BatchNorm and convolution, as the plain
        # calls of L1GradPenalty(every=4) do
        with penalty.plain_steps() if isinstance(penalty, L1GradPenalty) else contextlib.nullcontext():
            loss_of(x, y).backward()

    def forward_backward(x, y):
        loss = loss_of(x, y)
        if penalty is None:
            loss.backward()
        elif isinstance(penalty, _AutogradPenalty):
            penalty.backward(loss)
        else:
            penalty.backward(loss, lambda: loss_of(x, y), sync=False)

    if GRAPH:
        # one eager call of each function, then its capture: the benchmark's warm-up rounds cover both
        graphs = GraphedStep([forward_backward, plain_backward], model.parameters(), warmup=1)

        def run(i):
            graphs(x, y, variant=0 if i == 0 else 1)
    else:

        def run(i):
            forward_backward(x, y)

    def step():
        for i in range(steps):
            opt.zero_grad(set_to_none=True)
            run(i)
            opt.step()
        _sync()

    if GRAPH and mode == "every4":
        # each kind of step on its own, to tell what the mean of the two graphs is made of
        def one_kind(variant):
            def call():
                opt.zero_grad(set_to_none=True)
                graphs(x, y, variant=variant)
                opt.step()
                _sync()

            return call

        step.kinds = {"penalized": one_kind(0), "plain": one_kind(1)}
    return step, steps


def _peak_rss_mb(name, mode):
    """Peak resident memory of 4 steps over the resident size before them, in a fresh process (CPU)."""
    # glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so the resident size would
    # carry the previous step's garbage; a fixed 128 KiB threshold returns every tensor-sized block at free
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--peak-rss", name, mode],
        capture_output=True, text=True, check=True, env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def _info(benchmark, name, mode, dtype, extra):
    benchmark.extra_info.update(
        model=name, mode=mode, dtype=dtype, width=WIDTH, batch=BATCH, image_size=DATA[name][0], lam=LAMBDA,
        layout=LAYOUT, cuda_graph=GRAPH,
        device=torch.cuda.get_device_name() if CUDA else "cpu", threads=torch.get_num_threads(),
        torch=torch.__version__, triton=triton_version(), **extra,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["plain"] + MODES)
@pytest.mark.parametrize("name", MODELS)
def test_penalty_step(benchmark, name, mode, dtype):
    if GRAPH and mode == "exact_qgrad_recompute":
        pytest.skip("recompute runs in Python hooks during the backward, which a CUDA graph cannot replay")
    if not CUDA:  # page faults of glibc's malloc would add 10-15% to a plain step, unevenly (qgrad.malloc)
        keep_freed_memory()
    plain_step, _ = _setup(name, "plain", dtype)
    before = wall_times(plain_step, ROUNDS, warmup=WARMUP)
    del plain_step
    step, steps = _setup(name, mode, dtype)
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP)
    extra = {}
    for kind, call in getattr(step, "kinds", {}).items():
        extra[f"every4_{kind}_step_s"] = statistics.median(wall_times(call, ROUNDS, warmup=1))
    # a graph's memory is reserved at its capture and reused by every replay: the peak of an eager step is
    # the measure of what a step needs
    if CUDA and not GRAPH:
        extra["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    del step
    plain_step, _ = _setup(name, "plain", dtype)
    plain = statistics.median(before + wall_times(plain_step, ROUNDS, warmup=WARMUP))
    if CUDA and not GRAPH:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        plain_step()
        extra["plain_peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        extra["peak_memory_ratio"] = extra["peak_memory_mb"] / extra["plain_peak_memory_mb"]
    elif not CUDA:
        if name not in _PLAIN_RSS:
            _PLAIN_RSS[name] = _peak_rss_mb(name, "plain")
        extra["plain_peak_rss_mb"] = _PLAIN_RSS[name]
        extra["peak_rss_mb"] = _PLAIN_RSS[name] if mode == "plain" else _peak_rss_mb(name, mode)
        extra["peak_memory_ratio"] = extra["peak_rss_mb"] / extra["plain_peak_rss_mb"]
    step_s = benchmark.stats.stats.median / steps
    _info(benchmark, name, mode, dtype, {**extra, "plain_step_s": plain, "step_s": step_s,
                                         "ratio_to_plain": step_s / plain})


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--peak-rss":
    step_fn, _ = _setup(sys.argv[2], sys.argv[3], "float32")
    step_fn()  # one-time allocations (oneDNN primitives, optimizer state) are not part of a step's peak
    base = _status_kib("VmRSS")
    # writing 5 to clear_refs resets the high-water mark VmHWM (Linux >= 4.0); ru_maxrss cannot be reset and
    # would report the peak of the imports
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(3):
        step_fn()
    print(json.dumps({"peak_rss_mb": (_status_kib("VmHWM") - base) / 1024}))
