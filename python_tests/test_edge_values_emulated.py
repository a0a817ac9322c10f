"""The edge values of test_edge_values.py through the CUDA kernel's source, run by the SIMT emulator and
compared with the CPU op (itself checked against the float64 references there): a target margin beyond the
exponent range, label smoothing with -inf logits, large common offsets, rows with one finite logit, and
NaN distances in the uniformity regulariser's pair kernel. With a GPU the same cases also run
through the real CUDA op."""
from __future__ import annotations

import pytest
import torch

import ctypes

from emu import guarded, ptr
from test_emulation_kernels import (ANGULAR, HAS_CUDA, L, _check_vs_op, _default_options,  # noqa: F401
                                    _unif_fn, margin_ce_case, needs_ops)

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _kw(C, **over):
    _, _, kw = margin_ce_case(1, max(C, 1), torch.float64)
    kw.update(over)
    return kw


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("angular", ["linear", "arcface", "gclang"])
@pytest.mark.parametrize("C,s", [(1, 200.0), (2, 300.0), (37, 1e3), (300, 1e4)])
def test_margin_beyond_the_exponent_range(L, device, dtype, angular, C, s):  # noqa: F811
    g = torch.Generator().manual_seed(C)
    N = 5
    t = torch.arange(N) % C
    x = torch.rand(N, C, generator=g, dtype=torch.float64) * 1.6 - 0.8
    x[torch.arange(N), t] = 0.9  # the target holds the row max before its margin
    kw = _kw(C, scale=s, margin=torch.full((C,), 0.5, dtype=torch.float64), angular=ANGULAR[angular])
    if angular == "gclang":
        kw.update(cloud=torch.rand(C, generator=g, dtype=torch.float64),
                  noise=torch.randn(N, C, generator=g, dtype=torch.float64) / 3, angular_eps=0.1)
    loss, grad = _check_vs_op(L, x.to(dtype), t, kw, device=device)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), loss


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_label_smoothing_with_minus_inf_logits(L, device, dtype, weighted):  # noqa: F811
    x = torch.tensor([[1.0, float("-inf"), 0.5], [0.2, float("-inf"), -0.3], [0.1, 0.7, -0.4]], dtype=dtype)
    t = torch.tensor([1, 0, 2])
    kw = _kw(3, label_smoothing=0.5, weight=torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64) if weighted else None)
    for red in (0, 2):
        kw["reduction"] = red
        loss, _ = _check_vs_op(L, x, t, kw, device=device)
        assert not torch.isnan(loss).any(), loss
        ref = torch.nn.functional.cross_entropy(x, t, weight=kw["weight"].to(dtype) if weighted else None,
                                                reduction="none" if red == 0 else "mean", label_smoothing=0.5)
        torch.testing.assert_close(loss, ref)


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [1e4, -1e6, 1e30, -1e30])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_large_common_offsets(L, device, offset, smoothing):  # noqa: F811
    g = torch.Generator().manual_seed(1)
    N, C = 4, 300
    ulp = torch.finfo(torch.float32).eps * abs(offset)
    x = (torch.full((N, C), offset, dtype=torch.float64)
         + torch.randint(-3, 4, (N, C), generator=g).double() * ulp).float()
    t = torch.randint(0, C, (N,), generator=g)
    kw = _kw(C, label_smoothing=smoothing)
    loss, _ = _check_vs_op(L, x, t, kw, device=device)
    x64 = x.double()
    ref = torch.nn.functional.cross_entropy(x64 - x64.max(1, keepdim=True).values, t, label_smoothing=smoothing)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("C", [1, 37, 300])
def test_rows_with_one_finite_logit(L, device, smoothing, C):  # noqa: F811
    N = 4
    x = torch.full((N, C), float("-inf"))
    x[torch.arange(N), torch.arange(N) % C] = torch.tensor([3.0, -2.0, 1e4, 0.0])
    t = torch.arange(N) % C
    t[1] = (t[1] + 1) % C if C > 1 else t[1]  # a masked (-inf) target: loss inf
    kw = _kw(C, label_smoothing=smoothing, reduction=0)
    loss, _ = _check_vs_op(L, x, t, kw, device=device)
    ref = torch.nn.functional.cross_entropy(x, t, reduction="none", label_smoothing=smoothing)
    torch.testing.assert_close(loss, ref, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kernel,param", [(0, 2.0), (1, 1.0), (2, 0.0)], ids=["gaussian", "riesz", "log"])
def test_uniformity_pair_kernel_keeps_nan_distances(L, dtype, kernel, param):  # noqa: F811
    # a NaN weight makes its Gram row NaN: the clamp at dist_eps must keep it NaN (it used to give dist_eps)
    bi, bk = 3, 37
    g = torch.Generator().manual_seed(7)
    nI = torch.ones(bi, dtype=dtype)
    nK = torch.ones(bk, dtype=dtype)
    gram = torch.rand(bi, bk, generator=g, dtype=dtype) * 2 - 1
    gram[1, 5] = float("nan")
    gbuf = guarded(gram)
    fbuf = guarded(torch.full((bi, bk), 0.0, dtype=dtype))
    gnI, gnK = guarded(nI), guarded(nK)
    L.call(_unif_fn("pair_transform", dtype), ctypes.c_longlong(bi), ctypes.c_longlong(bk), ptr(gbuf), ptr(fbuf),
           ptr(gnI), ptr(gnK), ctypes.c_int(0), ctypes.c_int(kernel), ctypes.c_double(param),
           ctypes.c_double(1e-12))
    out = gbuf.reshape(bi, bk)
    assert torch.isnan(out[1, 5]), out[1, 5]
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    if kernel != 0:
        assert torch.isnan(fbuf.reshape(bi, bk)[1, 5])
