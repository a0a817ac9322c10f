"""Benchmarks: the fused, tiled hyperspherical uniformity op (ltkernels.regularisers.uniformity;
reconstructed from the abstract of Gao et al.) against its eager form (ltkernels.regularisers.
uniformity_reference: Gram matrix, C x C distances, masked log-sum-exp / mean), forward + backward.

Shapes ``(C, D)``: the issue's (8142, 2048) (target: fused at least 3x faster than eager, peak memory
O(C D)) plus (1000, 512). ``--bench-sizes smoke`` gives a tiny (37, 16); ``LTK_BENCH_UNIF_SHAPES="CxD,..."``
overrides. Kernels: ``gaussian`` (t = 2) and ``riesz`` (s = 1); ``LTK_BENCH_UNIF_KERNELS`` overrides.
float32. ``shape`` in the report is ``"CxD"``. The 8142 x 2048 case is heavy on 2 cores (eager: tens of
seconds per step, about 1.5 GB of C x C temporaries): it runs 2 rounds (pedantic), and the fused/eager
ratio is also measured interleaved (``extra_info["vs_eager_interleaved"]``, robust to load drift).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from ltkernels.regularisers import uniformity, uniformity_reference

SUITE = "regularisers"
STD_SHAPES = [(1000, 512), (8142, 2048)]
SMOKE_SHAPES = [(37, 16)]


def _shapes(config):
    env = os.environ.get("LTK_BENCH_UNIF_SHAPES")
    if env:
        return [tuple(int(v) for v in p.strip().lower().split("x")) for p in env.split(",") if p.strip()]
    sizes = config.ltk_bench.sizes
    return SMOKE_SHAPES if all(n * c < 10000 for n, c in sizes) else STD_SHAPES


def pytest_generate_tests(metafunc):
    if "unif_shape" in metafunc.fixturenames:
        shapes = _shapes(metafunc.config)
        metafunc.parametrize("unif_shape", shapes, ids=[f"{c}x{d}" for c, d in shapes])
    if "unif_kernel" in metafunc.fixturenames:
        ks = os.environ.get("LTK_BENCH_UNIF_KERNELS", "gaussian,riesz").split(",")
        metafunc.parametrize("unif_kernel", [k.strip() for k in ks if k.strip()])


def _inputs(C, D, seed=0):
    g = torch.Generator().manual_seed(seed + C * 7 + D)
    return torch.randn(C, D, generator=g)


def _step(impl, w, kernel):
    fn = uniformity if impl == "fused" else uniformity_reference

    def step():
        w.grad = None
        fn(w, kernel).backward()

    return step


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_uniformity(benchmark, record_case, peak_memory, unif_shape, unif_kernel, impl):
    C, D = unif_shape
    w = _inputs(C, D).requires_grad_(True)
    step = _step(impl, w, unif_kernel)
    heavy = C * C * D >= 1e10
    step()
    extra = {"threads": torch.get_num_threads(), "C": C, "D": D}
    if not benchmark.disabled:
        extra["peak_mem_bytes"] = peak_memory(step)
        extra["weight_bytes"] = C * D * 4
    if impl == "fused" and not benchmark.disabled:
        other = _step("eager", _inputs(C, D).requires_grad_(True), unif_kernel)
        ta, tb = [], []
        for _ in range(1 if heavy else 3):
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            other()
            t2 = time.perf_counter()
            ta.append(t1 - t0)
            tb.append(t2 - t1)
        extra["vs_eager_interleaved"] = round(min(tb) / min(ta), 3)
        # agreement (float32 op vs float32 eager)
        w2 = w.detach().clone().requires_grad_(True)
        v1 = float(uniformity(w2, unif_kernel).detach())
        v2 = float(uniformity_reference(w.detach(), unif_kernel))
        extra["rel_err_value"] = abs(v1 - v2) / max(abs(v2), 1e-30)
    record_case(suite=SUITE, case=f"uniformity-{unif_kernel}", shape=(C, D), dtype="fp32", mode="fwd+bwd",
                impl=impl, **extra)
    if heavy:
        benchmark.pedantic(step, rounds=1 if impl == "eager" else 2, iterations=1, warmup_rounds=0)
    else:
        benchmark(step)
