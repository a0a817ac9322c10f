"""Benchmarks: fused ltkernels losses vs the eager reference vs torch.compile(reference).

For every loss (and plain cross-entropy: fused ``CrossEntropyLoss`` vs ``F.cross_entropy``), shape
(``--bench-sizes``), dtype (``--bench-dtypes``; bf16 means bf16 input tensors, no autocast) and mode:

* ``fwd``: the loss value only (inputs do not require grad, so the fused kernel skips the gradient);
* ``fwd+bwd``: ``loss.backward()`` into the input (and into the features for FBL), grads reset to
  None before each step as ``optimizer.zero_grad()`` does.

``impl``: ``fused`` (ltkernels.losses), ``eager`` (ltkernels.reference, or F.cross_entropy for CE)
and ``compiled`` (``torch.compile(eager, dynamic=False)``, default inductor backend; compiled and
warmed up before timing; skipped with ``--bench-no-compile``). GCL and GCLAng are timed *without*
injected noise: eager draws it with ``torch.distributions.Normal(0, 1/3)`` like the official code
(part of its cost), fused draws it in-kernel.

``test_loss`` records the time (pytest-benchmark) and the peak extra memory of one step
(``peak_memory`` fixture, see bench/conftest.py) in ``extra_info``; for eager and compiled it also
times the fused step interleaved with it (alternating rounds, min of each) and records the ratio as
``extra_info["vs_fused_interleaved"]`` (the speedup the report shows: robust to load drift on a shared
machine; ``--bench-interleave-time 0`` turns it off). ``test_agree`` checks that fused
and eager agree on exactly the benchmarked inputs (GCL/GCLAng with one injected noise draw).
"""
from __future__ import annotations

import functools
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ltkernels.losses as fused_losses
import ltkernels.reference as ref_losses

SUITE = "losses"
FEAT_DIM = 64  # FBL feature width
FBL_CURR = 0.5  # FBL curriculum factor alpha(t) used in the benchmark (mid-training)
MODES = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}  # test id -> recorded mode
IMBALANCE = 100.0


@functools.lru_cache(maxsize=None)
def class_counts(C: int) -> tuple[int, ...]:
    """Exponential long-tail profile (CIFAR-LT style), imbalance ratio 100, head class 1000."""
    if C == 1:
        return (1000,)
    return tuple(max(1, int(1000 * IMBALANCE ** (-j / (C - 1)))) for j in range(C))


class TorchCE(nn.Module):
    """``F.cross_entropy`` as a module (the eager twin of the fused CrossEntropyLoss)."""

    def forward(self, input, target):
        return F.cross_entropy(input, target)


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "cos": inputs are cosines in [-1, 1]; "logit": raw logits ~ N(0, 1)
    fused: Callable[[tuple], nn.Module]
    eager: Callable[[tuple], nn.Module]
    features: bool = False  # FeaBalLoss: (logits, features, target, curr)
    noise: bool = False  # GCL family: forward(..., noise=) injects the raw draw
    tol: dict = field(default_factory=dict)


def _pair(name: str, *args, **kw):
    return (lambda counts: getattr(fused_losses, name)(*_a(args, counts), **kw),
            lambda counts: getattr(ref_losses, name)(*_a(args, counts), **kw))


def _a(args, counts):
    return tuple(counts if a is COUNTS else a for a in args)


COUNTS = object()  # placeholder for cls_num_list in _pair

CASES: dict[str, Case] = {}
for _name, _kind, _pr, _extra in [
    ("CE", "logit", (lambda c: fused_losses.CrossEntropyLoss(), lambda c: TorchCE()), {}),
    ("LDAM", "cos", _pair("LDAMLoss", COUNTS), {}),
    ("KPS", "cos", _pair("KPSLoss", COUNTS), {}),
    ("LA", "logit", _pair("LogitAdjustLoss", COUNTS), {}),
    ("BalancedSoftmax", "logit", _pair("BalancedSoftmaxLoss", COUNTS), {}),
    ("CosFace", "cos", _pair("CosFaceLoss"), {}),
    ("Focal", "logit", _pair("FocalLoss", gamma=2.0), {}),
    ("ClassBalanced", "logit", _pair("ClassBalancedLoss", COUNTS), {}),
    ("GCL", "cos", _pair("GCLLoss", COUNTS), {"noise": True}),
    ("GCLAng", "cos", _pair("GCLAngLoss", COUNTS), {"noise": True}),
    ("ArcFace", "cos", _pair("ArcFaceLoss"), {}),
    ("FBL", "logit", _pair("FeaBalLoss", COUNTS), {"features": True}),
]:
    CASES[_name] = Case(_name, _kind, _pr[0], _pr[1], **_extra)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64, "fp16": torch.float16}


def make_inputs(case: Case, N: int, C: int, dtype: str):
    """Deterministic inputs for (case, N, C): input (N, C), target (N,), features (N, D) or None."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{case.name}-{N}x{C}".encode()))
    if case.kind == "cos":
        x = torch.rand(N, C, generator=g) * 2 - 1
    else:
        x = torch.randn(N, C, generator=g) * 2
    t = torch.randint(0, C, (N,), generator=g)
    f = torch.randn(N, FEAT_DIM, generator=g) if case.features else None
    td = TORCH_DTYPES[dtype]
    return x.to(td), t, (f.to(td) if f is not None else None)


def caller(case: Case, mod) -> Callable:
    """``fn(x, t, f, noise=None) -> loss`` for the module ``mod`` of ``case``."""
    if case.features:
        return lambda x, t, f, noise=None: mod(x, f, t, curr=FBL_CURR)
    if case.noise:
        return lambda x, t, f, noise=None: mod(x, t) if noise is None else mod(x, t, noise=noise)
    return lambda x, t, f, noise=None: mod(x, t)


def build(case: Case, impl: str, C: int, backend: str = "inductor"):
    counts = list(class_counts(C))
    if impl == "fused":
        return case.fused(counts)
    mod = case.eager(counts)
    if impl == "eager":
        return mod
    if impl == "compiled":
        torch._dynamo.reset()  # fresh caches: no recompile limit across the many shapes/modes
        return torch.compile(mod, backend=backend, dynamic=False)
    raise ValueError(impl)


def pytest_generate_tests(metafunc):
    ns = metafunc.config.ltk_bench
    names = metafunc.fixturenames
    if "case" in names:
        cases = list(CASES)
        if getattr(ns, "cases", None):
            unknown = [c for c in ns.cases if c not in CASES]
            if unknown:
                raise pytest.UsageError(f"--bench-cases: unknown {unknown}; known: {', '.join(CASES)}")
            cases = [c for c in cases if c in ns.cases]
        metafunc.parametrize("case", cases)
    if "shape" in names:
        metafunc.parametrize("shape", ns.sizes, ids=[f"{n}x{c}" for n, c in ns.sizes])
    if "dtype" in names:
        metafunc.parametrize("dtype", ns.dtypes)
    if "mode" in names:
        metafunc.parametrize("mode", list(MODES.values()), ids=list(MODES))
    if "impl" in names:
        metafunc.parametrize("impl", ["fused", "eager"] + (["compiled"] if ns.compile else []))


@pytest.fixture(scope="module", autouse=True)
def _quiet_dynamo():
    # graph-break warnings of the reference (it validates targets with a data-dependent check)
    torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR)
    yield


def _grads(tensors):
    return [t.grad for t in tensors if t is not None]


def _steps(call, x, t, f, leaves, train):
    """(run, step): ``run`` is one loss (+ backward) call, ``step`` also resets the grads first."""

    def clear():
        for leaf in leaves:
            leaf.grad = None

    if not train:
        def run():
            call(x, t, f)
        return run, run, clear

    def run():
        call(x, t, f).backward()

    def step():
        clear()  # optimizer.zero_grad(set_to_none=True)
        run()
    return run, step, clear


def interleaved_ratio(fast, slow, budget: float, min_rounds: int = 5, max_rounds: int = 400) -> dict:
    """Time ``fast`` and ``slow`` in alternating rounds (order flipped every round) and return the
    min per-call time of each and ``ratio = min(slow) / min(fast)``. Both see the same load drift,
    so the ratio is far more stable on a shared machine than a ratio of two separate benchmarks."""
    clock = time.perf_counter

    def once(fn):
        t0 = clock()
        fn()
        return clock() - t0

    est = {fast: min(once(fast) for _ in range(2)), slow: min(once(slow) for _ in range(2))}
    inner = {fn: max(1, math.ceil(1e-3 / max(e, 1e-7))) for fn, e in est.items()}  # >= ~1 ms per block
    per_round = sum(est[fn] * inner[fn] for fn in est)
    rounds = int(min(max_rounds, max(min_rounds, budget / max(per_round, 1e-9))))
    best = {fast: math.inf, slow: math.inf}
    for r in range(rounds):
        for fn in ((fast, slow) if r % 2 == 0 else (slow, fast)):
            n = inner[fn]
            t0 = clock()
            for _ in range(n):
                fn()
            best[fn] = min(best[fn], (clock() - t0) / n)
    return {"fused_s": best[fast], "impl_s": best[slow], "ratio": best[slow] / best[fast], "rounds": rounds}


def test_loss(benchmark, record_case, peak_memory, bench_options, case, shape, dtype, mode, impl):
    spec = CASES[case]
    N, C = shape
    x, t, f = make_inputs(spec, N, C, dtype)
    mod = build(spec, impl, C, bench_options.compile_backend)
    train = mode == "fwd+bwd"
    leaves = [x] + ([f] if f is not None else [])
    if train:
        for leaf in leaves:
            leaf.requires_grad_(True)
    run, step, clear = _steps(caller(spec, mod), x, t, f, leaves, train)

    loss = caller(spec, mod)(x, t, f)  # (compiles the compiled impl's inference graph in fwd mode)
    assert torch.isfinite(loss.detach()).all(), f"{case}: non-finite loss {loss}"
    mem = fused_step = None
    if not benchmark.disabled:  # --benchmark-disable (correctness runs): one step, no profiler
        for _ in range(3 if impl == "compiled" else 2):  # warm-up: compile, first-touch pages
            step()
        clear()
        mem = peak_memory(run)
        clear()
        if impl != "fused" and bench_options.interleave_time > 0:
            _, fused_step, _ = _steps(caller(spec, build(spec, "fused", C)), x, t, f, leaves, train)
            fused_step()
            clear()
    item = TORCH_DTYPES[dtype].itemsize
    # from here on record_case also measures the CPU other processes use (extra_info["other_load"])
    record_case(suite=SUITE, case=case, shape=shape, dtype=dtype, mode=mode, impl=impl,
                peak_mem_bytes=mem, nc_bytes=N * C * item,
                backend=bench_options.compile_backend if impl == "compiled" else None)
    if fused_step is not None:
        inter = interleaved_ratio(fused_step, step, bench_options.interleave_time)
        clear()
        benchmark.extra_info.update(vs_fused_interleaved=inter["ratio"], interleaved=inter)
    benchmark(step)


# ----------------------------------------------------------------------------------------------
# Correctness on the benchmarked inputs
# ----------------------------------------------------------------------------------------------

def _loss_and_grads(call, x, t, f, noise, dtype=None):
    xs = x.detach().clone() if dtype is None else x.detach().to(dtype)
    fs = None if f is None else (f.detach().clone() if dtype is None else f.detach().to(dtype))
    xs.requires_grad_(True)
    if fs is not None:
        fs.requires_grad_(True)
    nz = None if noise is None else noise.to(xs.dtype)
    loss = call(xs, t, fs, nz)
    loss.backward()
    return loss.detach().double(), [g.double() for g in _grads([xs, fs])]


def _close(name, got, want, rtol_loss, rtol_grad):
    (lg, gg), (lw, gw) = got, want
    err = (lg - lw).abs().item()
    assert err <= rtol_loss * max(1.0, lw.abs().item()), f"{name}: loss {lg.item()} vs {lw.item()}"
    assert len(gg) == len(gw)
    for k, (a, b) in enumerate(zip(gg, gw)):
        scale = b.abs().max().item() or 1.0
        e = (a - b).abs().max().item()
        assert e <= rtol_grad * scale, f"{name}: grad[{k}] max err {e:.3g} vs max |grad| {scale:.3g}"


def test_agree(case, shape, dtype):
    """Fused and eager agree (loss and input/feature gradients) on the benchmarked inputs."""
    spec = CASES[case]
    N, C = shape
    x, t, f = make_inputs(spec, N, C, dtype)
    noise = None
    if spec.noise:
        noise = ref_losses.draw_gcl_noise(x.float())
    fused = caller(spec, build(spec, "fused", C))
    eager = caller(spec, build(spec, "eager", C))
    got = _loss_and_grads(fused, x, t, f, noise)
    if dtype in ("fp32", "fp64"):
        tol = 1e-9 if dtype == "fp64" else 1e-4
        _close(f"{case} fused vs eager", got, _loss_and_grads(eager, x, t, f, noise), tol, tol)
    else:
        # half inputs: the fused kernel accumulates in fp32, so compare it tightly with the eager
        # reference evaluated in fp32 on the same (half-valued) inputs; eager in the half dtype itself
        # rounds every intermediate, so it only agrees within the half type's precision.
        want32 = _loss_and_grads(eager, x, t, f, noise, torch.float32)
        # (FBL's feature gradient goes through torch's bf16 vector_norm backward: a few bf16 ulps)
        _close(f"{case} fused({dtype}) vs eager(fp32 of the same inputs)", got, want32, 1e-2, 3e-2)
        # eager bf16 rounds z = s * r_j * c (up to ~1e2) to 8 bits: its softmax is off by several %
        _close(f"{case} fused({dtype}) vs eager({dtype})", got, _loss_and_grads(eager, x, t, f, noise),
               5e-2, 2.5e-1)
