"""Fused cosine head (ltkernels.cosine): cosine_logits, NormedLinear, chunked cosine_head_loss.

Oracle: eager ``F.normalize(x, dim=1) @ F.normalize(W, dim=0)`` (+ the loss) through autograd.
Tolerances: float64 1e-10, float32 1e-5, both relative to the largest magnitude of the compared tensor
(the epilogue scales after the GEMM where eager scales before, so elementwise relative error of
near-zero entries is not meaningful).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import devices, other_isas, run_on_other_isas

import ltkernels.losses as fused
import ltkernels.reference as ref
from ltkernels.cosine import NormedLinear, cosine_head_loss, cosine_logits

ops = torch.ops.ltkernels
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
COUNTS = [500, 300, 200, 120, 80, 50, 30, 20, 12, 8, 5, 3, 2]  # C = 13


def close(actual, expected, dtype, what="", floor=1e-30):
    """assert_close with atol = tol * max(|expected|max, floor) (floor: the natural scale when the
    expected values may all vanish, e.g. the gradient of a D = 1 head)."""
    scale = max(expected.abs().max().item(), floor) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=TOL[dtype], atol=TOL[dtype] * scale, msg=lambda m: f"{what}: {m}")


def eager_cos(x, w):
    return F.normalize(x, dim=1) @ F.normalize(w, dim=0)


def grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def _operands(N, D, C, dtype, device, gen):
    x = torch.randn(N, D, dtype=dtype, generator=gen).to(device)
    w = torch.randn(D, C, dtype=dtype, generator=gen).to(device)
    return x, w


# ------------------------------------------------------------------------------------------------
# cosine_logits: forward and gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 5, 4), (33, 8, 70), (3, 40, 9), (1, 1, 1), (70, 3, 200)])
def test_parity(device, dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x, w = _operands(*shape, dtype, device, gen)
    x.requires_grad_(True), w.requires_grad_(True)
    out = cosine_logits(x, w)
    exp = eager_cos(x, w)
    close(out, exp, dtype, "forward")
    g = torch.randn(exp.shape, dtype=dtype, generator=gen).to(device)
    for a, e, name in zip(grads(out, (x, w), g), grads(exp, (x, w), g), ("dx", "dW")):
        close(a, e, dtype, name, floor=g.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", [1, 2])
@pytest.mark.parametrize("x_t,w_t", [(False, False), (True, False), (False, True), (True, True)])
def test_backward_paths_and_layouts(dtype, path, x_t, w_t):
    """Both backward strategies (prescaled gradient / normalised operands), with features and weight
    contiguous or transposed views; each gradient comes back in its operand's layout."""
    gen = torch.Generator().manual_seed(7)
    N, D, C = 9, 6, 11
    x = torch.randn(D, N, dtype=dtype, generator=gen).t() if x_t else torch.randn(N, D, dtype=dtype, generator=gen)
    w = torch.randn(C, D, dtype=dtype, generator=gen).t() if w_t else torch.randn(D, C, dtype=dtype, generator=gen)
    with torch.no_grad():
        x[2].zero_()
        w[:, 3].zero_()
    out, xn, wn = ops.cosine_logits(x, w)
    close(xn, x.norm(dim=1), dtype, "feature norms")
    close(wn, w.norm(dim=0), dtype, "weight norms")
    g = torch.randn(N, C, dtype=dtype, generator=gen)
    gx, gw = ops.cosine_logits_backward(g, x, w, xn, wn, 1e-12, True, True, path)
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ex, ew = grads(eager_cos(xr, wr), (xr, wr), g)
    close(gx, ex, dtype, "dx")
    close(gw, ew, dtype, "dW")
    assert gx.stride() == (x.stride() if x_t else (D, 1))
    assert gw.stride() == (w.stride() if w_t else (C, 1))
    only_x = ops.cosine_logits_backward(g, x, w, xn, wn, 1e-12, True, False, path)
    only_w = ops.cosine_logits_backward(g, x, w, xn, wn, 1e-12, False, True, path)
    assert only_x[1].numel() == 0 and only_w[0].numel() == 0
    close(only_x[0], ex, dtype, "dx alone")
    close(only_w[1], ew, dtype, "dW alone")
    # with the forward's logits: the tangent dot products come from sum(grad * logits)
    for gg in (g, g.t().contiguous().t()):
        lx, lw = ops.cosine_logits_backward(gg, x, w, xn, wn, 1e-12, True, True, 0, out)
        close(lx, ex, dtype, "dx (logits)")
        close(lw, ew, dtype, "dW (logits)")
        assert lx.stride() == gx.stride() and lw.stride() == gw.stride()


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(8, 5, 6), (4, 9, 6)])  # N > D, and N <= D (backward uses the logits)
def test_zero_and_tiny_vectors_like_normalize(device, dtype, shape):
    """Zero feature rows / weight columns, and vectors below the eps, behave like F.normalize in value
    and gradient (x / eps, no projection); vectors just above it get the projection."""
    gen = torch.Generator().manual_seed(3)
    x, w = _operands(*shape, dtype, device, gen)
    with torch.no_grad():
        x[0].zero_()
        x[1] *= 1e-14  # below eps = 1e-12
        x[2] = x[2] / x[2].norm() * 3e-12  # just above
        w[:, 0].zero_()
        w[:, 1] *= 1e-14
    for a, e in ((x, w), (x.t().contiguous().t(), w.t().contiguous().t())):
        a, e = a.clone().requires_grad_(True), e.clone().requires_grad_(True)
        out = cosine_logits(a, e)
        exp = eager_cos(a, e)
        close(out, exp, dtype, "forward")
        assert (out[0] == 0).all() and (out[:, 0] == 0).all()
        g = torch.randn(exp.shape, dtype=dtype, generator=gen).to(device)
        (gx, gw), (ex, ew) = grads(out, (a, e), g), grads(exp, (a, e), g)
        close(gx, ex, dtype, "dx")
        close(gw, ew, dtype, "dW")
        assert torch.isfinite(gx).all() and torch.isfinite(gw).all()


@pytest.mark.parametrize("device", devices)
def test_non_contiguous_inputs(device):
    dtype = torch.float64
    gen = torch.Generator().manual_seed(5)
    big_x = torch.randn(20, 16, dtype=dtype, generator=gen).to(device)
    big_w = torch.randn(12, 30, dtype=dtype, generator=gen).to(device)
    cases = [
        (big_x[::2, :12:2], big_w[::2, ::3]),  # strided views (copied once)
        (big_x[:, :6].t().t(), big_w[:6, 1:]),  # sliced views
        (big_x.t()[:6, :].t(), big_w[:6].t().contiguous().t()),  # transposed views (no copy)
        (big_x[:5, :0], big_w[:0, :4]),  # D = 0
        (big_x[:0, :6], big_w[:6, :4]),  # N = 0
        (big_x[:5, :6], big_w[:6, :0]),  # C = 0
    ]
    for x, w in cases:
        x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        out = cosine_logits(x, w)
        exp = eager_cos(x, w)
        close(out, exp, dtype, f"forward {tuple(x.shape)} {tuple(w.shape)}")
        g = torch.randn(exp.shape, dtype=dtype, generator=gen).to(device)
        for a, e in zip(grads(out, (x, w), g), grads(exp, (x, w), g)):
            close(a, e, dtype, "grad")
    # an expanded (stride 0) logit gradient, as autograd gives for out.sum()
    x, w = big_x[:4, :6].clone().requires_grad_(True), big_w[:6, :5].clone().requires_grad_(True)
    ga = torch.autograd.grad(cosine_logits(x, w).sum(), (x, w))
    ge = torch.autograd.grad(eager_cos(x, w).sum(), (x, w))
    for a, e in zip(ga, ge):
        close(a, e, dtype, "sum grad")


def test_out_in_layout_and_half_inputs():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w_cd = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)  # (C, D)
    out = cosine_logits(x, w_cd, layout="out_in")
    exp = F.normalize(x, dim=1) @ F.normalize(w_cd, dim=1).t()
    close(out, exp, torch.float64, "out_in forward")
    g = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    for a, e in zip(grads(out, (x, w_cd), g), grads(exp, (x, w_cd), g)):
        close(a, e, torch.float64, "out_in grad")
    # bf16 features with an fp32 weight (autocast-style): computed in float32
    xb = x.detach().to(torch.bfloat16)
    wf = w_cd.detach().float().t()
    out = cosine_logits(xb, wf)
    assert out.dtype == torch.float32
    close(out, eager_cos(xb.float(), wf), torch.float32, "bf16 features")


# ------------------------------------------------------------------------------------------------
# 16-bit operands: GEMMs in the input dtype (fp32 accumulation), norms and epilogues in fp32
# ------------------------------------------------------------------------------------------------
# Error budget against float64 math on the same (16-bit) inputs, with u the unit roundoff (2^-8 bf16,
# 2^-11 fp16) and |cos| <= 1:
# - bf16 forward: the GEMM's fp32 sum rounded to bf16, then the fp32 epilogue rounded again: 2 u |cos| at
#   most, so atol 2u.
# - fp16 forward: the normalised operands are rounded (u relative per element), the GEMM output once more:
#   about 2-3 u; atol 3u.
# - gradients: the prescaled (bf16) or raw (fp16) logit gradient, the GEMM output and the projected result
#   are each rounded once, and the projection subtracts a radial part as large as the gradient itself
#   (at D = 1 it cancels it exactly: the true gradient is 0), whose rounding survives in full: 8 u relative
#   to the gradient's largest entry (measured at most 1.7 u over these shapes, 8 u in the D = 1 case).
HALF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _close_half(actual, expected, dtype, k, what, floor=1e-30):
    """max |actual - expected| <= k u max(|expected|max, floor); floor as in close()."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    scale = expected.abs().max().item() if expected.numel() else 1.0
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    scale = max(scale, floor)
    assert err <= k * HALF[dtype] * scale, f"{what}: max error {err:.3g} > {k} u x {scale:.3g}"


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(6, 5, 4), (33, 8, 70), (3, 40, 9), (1, 1, 1), (70, 3, 200), (64, 96, 130)])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_half_parity(device, dtype, shape, layout):
    """16-bit features and weight: cosines and gradients in the input dtype, within the budget above of
    float64 math on the same inputs (N <= D also covers the backward that reuses the saved logits)."""
    gen = torch.Generator().manual_seed(sum(shape) + len(layout))
    N, D, C = shape
    x = torch.randn(N, D, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    w_store = torch.randn(*((D, C) if layout == "in_out" else (C, D)), generator=gen).to(device=device, dtype=dtype)
    w = w_store.requires_grad_(True)
    out = cosine_logits(x, w, layout=layout)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    exp = eager_cos(x64, w64 if layout == "in_out" else w64.t())
    _close_half(out, exp, dtype, 2 if dtype == torch.bfloat16 else 3, "forward")
    g = torch.randn(N, C, generator=gen).to(device=device, dtype=dtype)
    got = grads(out, (x, w), g)
    ref_g = grads(exp, (x64, w64), g.double())
    for a, e, name in zip(got, ref_g, ("dx", "dW")):
        assert a.shape == e.shape
        _close_half(a, e, dtype, 8, name, floor=g.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_op_returns_fp32_norms_and_takes_both_backward_paths(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 6, generator=gen).to(dtype)
    w = torch.randn(6, 11, generator=gen).to(dtype)
    out, xn, wn = ops.cosine_logits(x, w)
    assert out.dtype == dtype and xn.dtype == wn.dtype == torch.float32
    close(xn, x.float().norm(dim=1), torch.float32, "feature norms")
    close(wn, w.float().norm(dim=0), torch.float32, "weight norms")
    g = torch.randn(9, 11, generator=gen).to(dtype)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    exp = grads(eager_cos(x64, w64), (x64, w64), g.double())
    for path in (0, 1, 2):
        got = ops.cosine_logits_backward(g, x, w, xn, wn, 1e-12, True, True, path)
        for a, e, name in zip(got, exp, ("dx", "dW")):
            _close_half(a, e, dtype, 8, f"path {path} {name}")
    assert ops.cosine_norms(x, 1).dtype == torch.float32


def test_fp16_raw_dot_products_beyond_its_range_do_not_overflow():
    """|x| |w| = 1e6 > 65504: a GEMM on the raw fp16 operands would give inf; the fp16 path normalises
    them first (and its backward takes the normalised-operand path)."""
    gen = torch.Generator().manual_seed(8)
    x = (F.normalize(torch.randn(5, 16, generator=gen), dim=1) * 1000).half().requires_grad_(True)
    w = (F.normalize(torch.randn(16, 7, generator=gen), dim=0) * 1000).half().requires_grad_(True)
    assert torch.isinf((x.detach() @ w.detach())).any()  # the raw GEMM does overflow
    out = cosine_logits(x, w)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    exp = eager_cos(x64, w64)
    _close_half(out, exp, torch.float16, 3, "forward")
    g = torch.randn(5, 7, generator=gen).half()
    for a, e, name in zip(grads(out, (x, w), g), grads(exp, (x64, w64), g.double()), ("dx", "dW")):
        assert torch.isfinite(a).all()
        _close_half(a, e, torch.float16, 8, name)


def test_half_dtype_rules_and_autocast():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 8, generator=gen)
    w = torch.randn(8, 5, generator=gen)
    # both bf16: bf16 cosines (no silent upcast)
    assert cosine_logits(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16
    # mixed outside autocast: promoted (bf16 + fp32 -> fp32; fp16 + bf16 -> fp32)
    assert cosine_logits(x.bfloat16(), w).dtype == torch.float32
    assert cosine_logits(x.half(), w.bfloat16()).dtype == torch.float32
    # under autocast, as F.linear: both operands in the autocast dtype, gradients back in each leaf's dtype
    wp = w.clone().requires_grad_(True)
    xp = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cosine_logits(xp, wp)
        lin = F.linear(xp, wp.t())
    assert out.dtype == lin.dtype == torch.bfloat16
    out.float().sum().backward()
    assert wp.grad.dtype == torch.float32 and xp.grad.dtype == torch.float32
    x64, w64 = x.bfloat16().double().requires_grad_(True), w.bfloat16().double().requires_grad_(True)
    _close_half(out, eager_cos(x64, w64), torch.bfloat16, 2, "autocast forward")
    # float64 stays float64 under autocast (autocast leaves it alone)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cosine_logits(x.double(), w.double()).dtype == torch.float64


def test_half_opcheck_and_compile():
    gen = torch.Generator().manual_seed(12)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(6, 5, generator=gen).to(dtype)
        w = torch.randn(5, 7, generator=gen).to(dtype)
        torch.library.opcheck(ops.cosine_logits.default,
                              (x.clone().requires_grad_(True), w.clone().requires_grad_(True)),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        xn, wn = x.float().norm(dim=1), w.float().norm(dim=0)
        g = torch.randn(6, 7, generator=gen).to(dtype)
        torch.library.opcheck(ops.cosine_logits_backward.default, (g, x, w, xn, wn, 1e-12, True, True, 0),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(ops.cosine_norms.default, (w, 0), test_utils=("test_schema", "test_faketensor"))
        out = ops.cosine_logits(x, w)[0]
        torch.library.opcheck(ops.cosine_grad_prep_.default, (g.clone(), out, xn, wn, 1e-12),
                              test_utils=("test_schema", "test_faketensor"))
    head = NormedLinear(8, 5)
    x = torch.randn(4, 8, generator=gen)
    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, exp = compiled(x), head(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, exp, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_head_loss_chunked_equals_head_then_loss(dtype):
    """cosine_head_loss on 16-bit operands against float64 head + loss on the same operands. With s = 1 the
    logits carry the forward's error (2u for bf16; fp16 is computed in fp32 by cosine_head_loss), a mean CE
    moves by at most twice its largest logit error, and the gradients by a few u more (the weight gradient
    of every chunk is summed in fp32, so chunking adds no 16-bit rounding per chunk)."""
    gen = torch.Generator().manual_seed(21)
    N, D, C = 40, 12, len(COUNTS)
    x = (torch.randn(N, D, generator=gen) * 3).to(dtype)
    w = torch.randn(D, C, generator=gen).to(dtype)
    target = torch.randint(0, C, (N,), generator=gen)
    loss = fused.LDAMLoss(COUNTS, s=1.0)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    exp = loss(eager_cos(x64, w64), target)
    eg = torch.autograd.grad(exp, (x64, w64))
    for chunk in (7, N):
        xc, wc = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        got = cosine_head_loss(xc, wc, target, loss, chunk_size=chunk)
        assert abs(got.item() - exp.item()) <= 4 * HALF[dtype], (chunk, got.item(), exp.item())
        gg = torch.autograd.grad(got, (xc, wc))
        for a, e, name in zip(gg, eg, ("dx", "dW")):
            _close_half(a, e, dtype, 16, f"chunk={chunk} {name}")


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cosine_logits(a, b), (x, w))
    wt = torch.randn(6, 4, dtype=torch.float64, generator=gen).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: cosine_logits(a, b, layout="out_in"), (x, wt))
    # features given as a transposed view (the no-copy transposed path)
    xt = torch.randn(4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cosine_logits(a.t(), b), (xt, w))


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    w = torch.randn(5, 7, dtype=torch.float64, generator=gen)
    fake_only = ("test_schema", "test_faketensor")  # the full set (with aot_dispatch) once per op
    torch.library.opcheck(ops.cosine_logits.default, (x.clone().requires_grad_(True), w.clone().requires_grad_(True)))
    torch.library.opcheck(ops.cosine_logits.default, (x.clone().requires_grad_(True), w.t().contiguous().t()),
                          {"eps": 1e-6}, test_utils=fake_only + ("test_autograd_registration",))
    xn, wn = x.norm(dim=1), w.norm(dim=0)
    g = torch.randn(6, 7, dtype=torch.float64, generator=gen)
    torch.library.opcheck(ops.cosine_logits_backward.default, (g, x, w, xn, wn, 1e-12, True, True, 0))
    for path in (1, 2):
        torch.library.opcheck(ops.cosine_logits_backward.default, (g, x, w, xn, wn, 1e-12, True, True, path),
                              test_utils=fake_only)
    torch.library.opcheck(ops.cosine_logits_backward.default,
                          (g, x.t().contiguous().t(), w.t().contiguous().t(), xn, wn, 1e-12, True, False),
                          test_utils=fake_only)
    torch.library.opcheck(ops.cosine_scale_.default, (g.clone(), xn, wn, 1e-12))
    torch.library.opcheck(ops.cosine_scale_.default, (g.clone(), None, wn), test_utils=fake_only)
    torch.library.opcheck(ops.cosine_tangent_.default,
                          (torch.randn_like(w), w, wn, 1e-12, 0, True, torch.tensor(0.5, dtype=torch.float64)))
    torch.library.opcheck(ops.cosine_tangent_.default, (torch.randn_like(x), x, xn, 1e-12, 1, False, None),
                          test_utils=fake_only)
    torch.library.opcheck(ops.cosine_norms.default, (w, 0))
    torch.library.opcheck(ops.cosine_norms.default, (x.t().contiguous().t(), 1), test_utils=fake_only)
    out = ops.cosine_logits(x, w)[0]
    torch.library.opcheck(ops.cosine_logits_backward.default, (g, x, w, xn, wn, 1e-12, True, True, 0, out),
                          test_utils=fake_only)
    torch.library.opcheck(ops.cosine_grad_prep_.default, (g.clone(), out, xn, wn, 1e-12))
    torch.library.opcheck(ops.cosine_tangent_.default,
                          (torch.randn_like(w), w, wn, 1e-12, 0, True, None, torch.randn(7, dtype=torch.float64)),
                          test_utils=fake_only)


def test_cosine_norms():
    gen = torch.Generator().manual_seed(6)
    m = torch.randn(9, 7, dtype=torch.float64, generator=gen)
    for t in (m, m.t().contiguous().t(), m[::2, 1:]):
        for dim in (0, 1, -1):
            close(ops.cosine_norms(t, dim), torch.linalg.vector_norm(t, dim=dim), torch.float64, f"dim={dim}")
    with pytest.raises(ValueError, match="dim"):
        ops.cosine_norms(m, 2)


def test_grad_prep_and_tangent_with_dots():
    """cosine_grad_prep_ scales the logit gradient like cosine_scale_ and returns the row / column sums
    of grad * logits, which are exactly the tangent dot products x_i . (G2 W^T)_i and w_j . (x^T G2)_j."""
    dtype = torch.float64
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, 5, dtype=dtype, generator=gen)
    w = torch.randn(5, 9, dtype=dtype, generator=gen)
    with torch.no_grad():
        x[1].zero_()
        w[:, 2].zero_()
    out, xn, wn = ops.cosine_logits(x, w)
    g = torch.randn(7, 9, dtype=dtype, generator=gen)
    for gg in (g.clone(), g.t().contiguous().t()):
        rd, cd = ops.cosine_grad_prep_(gg, out, xn, wn)
        close(rd, (g * out).sum(1), dtype, "row sums")
        close(cd, (g * out).sum(0), dtype, "column sums")
        g2 = g.clone()
        ops.cosine_scale_(g2, xn, wn)
        close(gg, g2, dtype, "scaled")
        close(rd, (x * (gg @ w.t())).sum(1), dtype, "x dots")
        close(cd, (w * (x.t() @ gg)).sum(0), dtype, "w dots")
    for dim, (grad, vec, n, d) in enumerate([(x.t() @ gg, w, wn, cd), (gg @ w.t(), x, xn, rd)]):
        a, b = grad.clone(), grad.clone()
        s = torch.tensor(0.7, dtype=dtype)
        ops.cosine_tangent_(a, vec, n, 1e-12, dim, True, s)
        ops.cosine_tangent_(b, vec, n, 1e-12, dim, True, s, d)
        close(b, a, dtype, f"tangent with dots, dim={dim}")


def test_saved_logits_modified_in_place_is_an_error():
    x = torch.randn(3, 8, requires_grad=True)  # N <= D: the logits are kept for the backward
    w = torch.randn(8, 4, requires_grad=True)
    out = cosine_logits(x, w)
    out.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    x2 = torch.randn(9, 2, requires_grad=True)  # N > D: nothing saved, in-place use is fine
    out = cosine_logits(x2, torch.randn(2, 4, requires_grad=True))
    out.mul_(2.0)
    out.sum().backward()


def test_compile_fullgraph_normed_linear():
    torch.manual_seed(0)
    head = NormedLinear(8, 5)
    x = torch.randn(6, 8, requires_grad=True)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    out_c = compiled(x)
    out_e = head(x)
    close(out_c, out_e, torch.float32, "compiled forward")
    gc = torch.autograd.grad(out_c.square().sum(), (x, head.weight))
    ge = torch.autograd.grad(out_e.square().sum(), (x, head.weight))
    for a, e in zip(gc, ge):
        close(a, e, torch.float32, "compiled grad")


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    torch.manual_seed(0)
    head = NormedLinear(8, 5)
    x = torch.randn(6, 8, requires_grad=True)
    compiled = torch.compile(head, fullgraph=True)
    out_c = compiled(x)
    close(out_c, head(x), torch.float32, "inductor forward")
    out_c.sum().backward()
    assert head.weight.grad is not None


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 3)
    w = torch.randn(3, 5)
    with pytest.raises(ValueError, match="2-D"):
        cosine_logits(x[0], w)
    with pytest.raises(ValueError, match="2-D"):
        cosine_logits(x, w[0])
    with pytest.raises(ValueError, match="D=3"):
        cosine_logits(x, torch.randn(4, 5))
    with pytest.raises(ValueError, match="layout"):
        cosine_logits(x, w, layout="cd")
    with pytest.raises(TypeError, match="floating"):
        cosine_logits(x.long(), w)
    with pytest.raises(TypeError, match="same dtype"):
        cosine_logits(x.double(), w)
    with pytest.raises(TypeError, match="tensors"):
        cosine_logits(x.tolist(), w)
    with pytest.raises(ValueError, match="eps"):
        cosine_logits(x, w, eps=0.0)
    with pytest.raises(ValueError, match="weight is on meta"):
        cosine_logits(x, w.to("meta"))
    # the op itself (C++ checks) raises the same Python exception types
    with pytest.raises(ValueError, match="disagree on D"):
        ops.cosine_logits(x, torch.randn(4, 5))
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        ops.cosine_logits(x.int(), w.int())
    with pytest.raises(TypeError, match="feature_norm must have dtype Float"):  # 16-bit data: fp32 norms
        ops.cosine_logits_backward(torch.randn(4, 5).bfloat16(), x.bfloat16(), w.bfloat16(),
                                   x.norm(dim=1).bfloat16(), w.norm(dim=0), 1e-12, True, True)
    with pytest.raises(ValueError, match="grad must have shape"):
        ops.cosine_logits_backward(torch.randn(4, 4), x, w, x.norm(dim=1), w.norm(dim=0), 1e-12, True, True)
    with pytest.raises(ValueError, match="weight_norm"):
        ops.cosine_logits_backward(torch.randn(4, 5), x, w, x.norm(dim=1), w.norm(dim=1), 1e-12, True, True)
    with pytest.raises(ValueError, match="path"):
        ops.cosine_logits_backward(torch.randn(4, 5), x, w, x.norm(dim=1), w.norm(dim=0), 1e-12, True, True, 3)
    with pytest.raises(RuntimeError, match="memory location"):
        ops.cosine_scale_(torch.zeros(1, 5).expand(4, 5), None, w.norm(dim=0))
    with pytest.raises(ValueError, match="dim"):
        ops.cosine_tangent_(torch.randn(4, 3), x, x.norm(dim=1), 1e-12, 2, False)
    # head + loss
    loss = fused.CosFaceLoss()
    with pytest.raises(ValueError, match="target"):
        cosine_head_loss(x, w, torch.zeros(3, dtype=torch.long), loss)
    with pytest.raises(ValueError, match="chunk_size"):
        cosine_head_loss(x, w, torch.zeros(4, dtype=torch.long), loss, chunk_size=0)
    with pytest.raises(ValueError, match="noise"):
        cosine_head_loss(x, w, torch.zeros(4, dtype=torch.long), loss, noise=torch.zeros(4, 4))
    with pytest.raises(TypeError, match="loss module"):
        cosine_head_loss(x, w, torch.zeros(4, dtype=torch.long), lambda c, t: c.sum())


# ------------------------------------------------------------------------------------------------
# NormedLinear
# ------------------------------------------------------------------------------------------------
def test_normed_linear_init_layouts_and_loading():
    from ltkernels.models.heads import NormedLinear as EagerNormedLinear

    torch.manual_seed(0)
    official = EagerNormedLinear(6, 4)  # the official module's init and layout
    torch.manual_seed(0)
    a = NormedLinear(6, 4)
    torch.manual_seed(0)
    b = NormedLinear(6, 4, layout="out_in")
    assert a.weight.shape == (6, 4) and b.weight.shape == (4, 6)
    torch.testing.assert_close(a.weight, official.weight)  # same draw, same renormalisation
    torch.testing.assert_close(b.weight, official.weight.t())
    torch.testing.assert_close(a.weight.norm(dim=0), torch.ones(4))
    x = torch.randn(3, 6)
    close(a(x), official(x), torch.float32, "vs eager NormedLinear")
    close(b(x), official(x), torch.float32, "out_in vs eager NormedLinear")
    torch.testing.assert_close(a.class_weight(), b.class_weight())
    # official (D, C) checkpoints load into both layouts, and each layout's own state dict into the other
    sd = {"weight": torch.randn(6, 4)}
    for m in (NormedLinear(6, 4), NormedLinear(6, 4, layout="out_in")):
        m.load_state_dict(sd)
        torch.testing.assert_close(m.weight_in_out(), sd["weight"])
    c = NormedLinear(6, 4)
    c.load_state_dict(b.state_dict())
    torch.testing.assert_close(c.weight, b.weight.t())
    with pytest.raises(RuntimeError, match="size mismatch"):
        c.load_state_dict({"weight": torch.randn(5, 4)})
    assert "layout='in_out'" in repr(c)


# ------------------------------------------------------------------------------------------------
# Head + loss in chunks
# ------------------------------------------------------------------------------------------------
def _loss_cases(mod):
    w = torch.linspace(0.5, 2.0, len(COUNTS), dtype=torch.float64)
    return {
        "LDAM+DRW weights": (mod.LDAMLoss(COUNTS, max_m=0.5, s=30, weight=w), False),
        "KPS (GA stage)": (mod.KPSLoss(COUNTS, max_m=0.2, s=15, weighted=True), False),
        "CosFace": (mod.CosFaceLoss(s=64.0, m=0.4), False),
        "GCL stage 2 (focal)": (mod.GCLLoss(COUNTS, m=0.1, s=20, noise_mul=0.5, train_cls=True, gamma=1.0), True),
        "GCL stage 1 weighted": (mod.GCLLoss(COUNTS, m=0.0, s=30, noise_mul=0.5, weight=w), True),
        "GCLAng": (mod.GCLAngLoss(COUNTS, m=0.2, epsilon=0.1, s=30), True),
        "ArcFace": (mod.ArcFaceLoss(s=64.0, m=0.5), False),
        "CE weighted ignore_index": (mod.CrossEntropyLoss(weight=w, ignore_index=2), False),
        "CB batch mean": (mod.ClassBalancedLoss(COUNTS), False),
        "CE sum": (mod.CrossEntropyLoss(reduction="sum"), False),
    }


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_head_loss_chunked_equals_head_then_loss(device, impl, dtype):
    mod = fused if impl == "fused" else ref
    gen = torch.Generator().manual_seed(42)
    N, D, C = 23, 10, len(COUNTS)
    x = (torch.randn(N, D, dtype=dtype, generator=gen) * 3).to(device)
    w = torch.randn(D, C, dtype=dtype, generator=gen).to(device)
    with torch.no_grad():
        x[4].zero_()  # a zero feature row on the chunked path too
    target = torch.randint(0, C, (N,), generator=gen).to(device)
    noise = (torch.randn(N, C, dtype=dtype, generator=gen) / 3).to(device)
    for name, (loss, takes_noise) in _loss_cases(mod).items():
        loss = loss.to(device)
        kw = {"noise": noise} if takes_noise else {}
        xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        exp = loss(eager_cos(xe, we), target, **kw)
        eg = torch.autograd.grad(exp * 1.7, (xe, we))
        for chunk in (1, 5, N):
            xc, wc = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            got = cosine_head_loss(xc, wc, target, loss, chunk_size=chunk, **kw)
            close(got, exp, dtype, f"{name} chunk={chunk} loss")
            gg = torch.autograd.grad(got * 1.7, (xc, wc))
            close(gg[0], eg[0], dtype, f"{name} chunk={chunk} dx")
            close(gg[1], eg[1], dtype, f"{name} chunk={chunk} dW")


def test_head_loss_layouts_partial_grads_and_no_grad():
    dtype = torch.float64
    gen = torch.Generator().manual_seed(8)
    N, D, C = 17, 6, len(COUNTS)
    x = torch.randn(N, D, dtype=dtype, generator=gen)
    w_cd = torch.randn(C, D, dtype=dtype, generator=gen)
    target = torch.randint(0, C, (N,), generator=gen)
    loss = fused.LDAMLoss(COUNTS)
    # (C, D) weight (out_in layout) and a transposed-view feature matrix
    xt = x.t().contiguous().t()
    for feats_grad, weight_grad in ((True, True), (False, True), (True, False)):
        xe, we = xt.clone().requires_grad_(feats_grad), w_cd.clone().requires_grad_(weight_grad)
        exp = loss(F.normalize(xe, dim=1) @ F.normalize(we, dim=1).t(), target)
        xc, wc = xt.clone().requires_grad_(feats_grad), w_cd.clone().requires_grad_(weight_grad)
        got = cosine_head_loss(xc, wc, target, loss, chunk_size=4, layout="out_in")
        close(got, exp, dtype, "loss")
        exp.backward()
        got.backward()
        for a, e in ((xc, xe), (wc, we)):
            if e.requires_grad:
                close(a.grad, e.grad, dtype, "grad")
            else:
                assert a.grad is None
    with torch.no_grad():
        v = cosine_head_loss(x, w_cd, target, loss, chunk_size=4, layout="out_in")
    close(v, loss(F.normalize(x, dim=1) @ F.normalize(w_cd, dim=1).t(), target), dtype, "no_grad")
    # backward twice through the same chunked loss is refused (gradients are finished in place)
    xc = x.clone().requires_grad_(True)
    got = cosine_head_loss(xc, w_cd.t(), target, loss, chunk_size=4)
    got.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        got.backward()


class _GCLPerRow(fused.GCLLoss):
    """Fused GCL with per-row losses (reduction 'none'), in-kernel noise."""

    def kernel_kwargs(self, cosine, noise=None, seed=None, offset=0):
        return {**super().kernel_kwargs(cosine, noise, seed, offset), "reduction": "none"}


def test_head_loss_per_row_recomputes_with_the_same_noise():
    """reduction 'none' with the kernel's own noise: the backward replays each chunk's random draw, so
    the gradients are those of the returned per-row losses."""
    dtype = torch.float64
    gen = torch.Generator().manual_seed(9)
    N, D, C = 14, 5, len(COUNTS)
    x = torch.randn(N, D, dtype=dtype, generator=gen)
    w = torch.randn(D, C, dtype=dtype, generator=gen)
    target = torch.randint(0, C, (N,), generator=gen)
    go = torch.rand(N, dtype=dtype, generator=gen)
    for own_generator in (False, True):
        loss = _GCLPerRow(COUNTS, m=0.1, s=20, noise_mul=1.0,
                          generator=torch.Generator().manual_seed(5) if own_generator else None)
        state = loss.generator.get_state() if own_generator else None
        torch.manual_seed(123)
        xc, wc = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        got = cosine_head_loss(xc, wc, target, loss, chunk_size=4)
        gg = torch.autograd.grad(got, (xc, wc), go)
        # the same chunks one by one, same random stream
        torch.manual_seed(123)
        if own_generator:
            loss.generator.set_state(state)
        xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        exp = torch.cat([loss(cosine_logits(xe[r:r + 4], we), target[r:r + 4]) for r in range(0, N, 4)])
        close(got, exp, dtype, "per-row losses")
        for a, e in zip(gg, torch.autograd.grad(exp, (xe, we), go)):
            close(a, e, dtype, "per-row grads")


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_head_loss_threads_share_one_loss_module(impl):
    """Two threads on one loss module at once: one runs cosine_head_loss in many chunks, the other calls the
    module directly and cosine_head_loss with other chunks; every value and gradient equals the one computed
    in a single thread. (cosine_head_loss reads the module's cross-entropy call, ``cross_entropy_call``, and
    runs it per chunk; nothing on the module is swapped for the duration of a chunk, so the other thread's
    call cannot run into it and get a chunk's sum, or make the chunk see two cross-entropy calls.)"""
    import sys
    import threading

    mod = fused if impl == "fused" else ref
    dtype = torch.float64
    gen = torch.Generator().manual_seed(17)
    N, D, C = 24, 6, len(COUNTS)
    x = torch.randn(N, D, dtype=dtype, generator=gen)
    w = torch.randn(D, C, dtype=dtype, generator=gen)
    target = torch.randint(0, C, (N,), generator=gen)
    noise = torch.randn(N, C, dtype=dtype, generator=gen) / 3
    weights = torch.linspace(0.5, 2.0, C, dtype=torch.float64)
    cases = {"LDAM+DRW weights": (mod.LDAMLoss(COUNTS, s=30, weight=weights), {}),
             "CB batch mean": (mod.ClassBalancedLoss(COUNTS), {}),
             "GCL weighted, injected noise": (mod.GCLLoss(COUNTS, m=0.1, s=20, weight=weights), {"noise": noise})}

    def value_and_grads(f):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = f(xx, ww)
        return (out.detach(), *torch.autograd.grad(out, (xx, ww)))

    fns = {}
    for name, (loss, kw) in cases.items():
        fns[name, "chunks of 1"] = lambda a, b, loss=loss, kw=kw: cosine_head_loss(a, b, target, loss, chunk_size=1,
                                                                                   **kw)
        fns[name, "chunks of 5"] = lambda a, b, loss=loss, kw=kw: cosine_head_loss(a, b, target, loss, chunk_size=5,
                                                                                   **kw)
        fns[name, "module"] = lambda a, b, loss=loss, kw=kw: loss(eager_cos(a, b), target, **kw)
    single = {k: value_and_grads(f) for k, f in fns.items()}
    jobs = [[k for k in fns if k[1] == "chunks of 1"], [k for k in fns if k[1] != "chunks of 1"]]
    barrier = threading.Barrier(len(jobs))
    got, errors = [], []

    def worker(keys):
        try:
            barrier.wait()
            for _ in range(15):
                for k in keys:
                    got.append((k, value_and_grads(fns[k])))
        except Exception as e:  # reported below
            errors.append(f"{type(e).__name__}: {e}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: inside every chunk
    try:
        threads = [threading.Thread(target=worker, args=(keys,)) for keys in jobs]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    assert len(got) == 15 * len(fns)
    for k, res in got:
        for a, e, what in zip(res, single[k], ("loss", "dx", "dW")):
            torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m, k=k, what=what: f"{k} {what}: {m}")


def _peak_extra_bytes(fn) -> int:
    """Peak bytes allocated by torch's CPU allocator during fn() above what was live before
    (torch.profiler memory events; the same method as bench/conftest.py's peak_memory)."""
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if e.device_type() == DeviceType.CPU:
            cur += e.nbytes()
            peak = max(peak, cur)
    return peak


def test_head_loss_peak_memory():
    """Chunked head + loss (fwd+bwd) at N=256, D=32, C=20000 (float32, chunks of 16 rows): its peak extra
    memory stays below (weight gradient + feature gradient + 8 chunk-sized buffers + slack) and below a
    quarter of the unchunked fused head-then-loss."""
    N, D, C, chunk = 256, 32, 20000, 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, requires_grad=True)
    w = torch.randn(D, C, generator=gen, requires_grad=True)
    target = torch.randint(0, C, (N,), generator=gen)
    loss = fused.LDAMLoss([max(1, 1000 - j // 25) for j in range(C)], weight=torch.rand(C, dtype=torch.float64))

    def chunked():
        cosine_head_loss(x, w, target, loss, chunk_size=chunk).backward()

    def unchunked():
        loss(cosine_logits(x, w), target).backward()

    for fn in (chunked, unchunked):  # warm up (first-call allocations)
        fn()
        x.grad = w.grad = None
    peak_chunked = _peak_extra_bytes(chunked)
    x.grad = w.grad = None
    peak_full = _peak_extra_bytes(unchunked)
    x.grad = w.grad = None
    f = 4
    bound = f * (D * C + N * D + 8 * chunk * C) + (1 << 20)
    assert peak_chunked <= bound, (peak_chunked, bound)
    assert peak_chunked * 4 <= peak_full, (peak_chunked, peak_full)


# ---------------------------------------------------------------------------------------------------
# Instruction-set builds: the head's CPU kernels (cpu/cosine_head_kernels.h) are compiled once per ISA
# ---------------------------------------------------------------------------------------------------
def isa_primitive_bytes() -> list[str]:
    """Raw bytes (hex) of every cosine primitive's output on fixed inputs (numpy-generated: torch.randn's
    own kernel depends on the ISA), rows and columns as vectors, float32 and float64."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for dt in (torch.float32, torch.float64):
        for rows, cols in [(7, 19), (128, 100), (5, 1000), (300, 33)]:
            m = torch.from_numpy(rng.standard_normal((rows, cols))).to(dt)
            g = torch.from_numpy(rng.standard_normal((rows, cols))).to(dt)
            for dim in (0, 1):
                n = ops.cosine_norms(m, dim)
                out.append(n)
                for prescaled in (False, True):
                    gg = g.clone()
                    ops.cosine_tangent_(gg, m, n, 1e-12, dim, prescaled)
                    out.append(gg)
            rn, cn = ops.cosine_norms(m, 1), ops.cosine_norms(m, 0)
            s = g.clone()
            ops.cosine_scale_(s, rn, cn, 1e-12)
            s2 = g.clone()
            rd, cd = ops.cosine_grad_prep_(s2, m, rn, cn, 1e-12)
            out += [s, s2, rd, cd]
    return [t.contiguous().numpy().tobytes().hex() for t in out]


def test_cosine_kernels_same_bits_on_every_isa():
    """The default and AVX2 builds (forced with ATEN_CPU_CAPABILITY in subprocesses) give bit for bit the
    outputs of this process's build: the loops only vectorise independent lanes (no reassociation)."""
    if not other_isas():
        pytest.skip("only one instruction-set build can run here")
    here = ops.cpu_isa()
    mine, results = run_on_other_isas("test_cosine_head", "isa_primitive_bytes", isa_primitive_bytes)
    for isa, (got_isa, theirs) in results.items():
        assert got_isa == isa
        differing = [k for k, (a, b) in enumerate(zip(mine, theirs)) if a != b]
        assert len(theirs) == len(mine) and not differing, f"[{isa}] outputs {differing} differ from {here}'s"


def test_second_derivative_refused_not_silently_missing():
    """create_graph=True through cosine_logits raises (the backward op has no derivative of its own, so a
    gradient penalty would silently lack the head's term); plain backward is unaffected."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(cosine_logits(x, w).square().sum(), x, create_graph=True)
    (gx,) = torch.autograd.grad(cosine_logits(x, w).square().sum(), x)
    (gx_ref,) = torch.autograd.grad(eager_cos(x, w).square().sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
