"""The fused op ``torch.ops.ltkernels.margin_ce`` / ``ltkernels.functional.margin_cross_entropy`` against
the eager oracle ``ltkernels.reference.margin_cross_entropy`` (and ``F.cross_entropy`` where PyTorch
defines the answer): every reduction, per-class vector, focal mode, label smoothing, ignore_index, dtype,
layout and shape; gradcheck, opcheck, torch.compile; both CPU instruction-set builds; bad input.

Expected values never come from the code under test: they come from the reference (plain autograd over
torch ops, itself tested against numpy in test_reference.py) or from torch.nn.functional.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import cpu_flags, devices, run_on_other_isas  # noqa: F401  (devices: ltk_device)

from ltkernels import _ops
from ltkernels import functional as LF
from ltkernels import reference as R

ops = torch.ops.ltkernels
fused = LF.margin_cross_entropy
ref = R.margin_cross_entropy

REDUCTIONS = list(_ops.REDUCTIONS)
ARG = {name: i for i, name in enumerate(_ops.MARGIN_CE_ARGS)}  # position of each op argument
F64 = dict(rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# data and helpers
# ----------------------------------------------------------------------------------------------------------


def make_inputs(N, C, seed=0, spread=2.0):
    """float64 CPU logits in [-spread, spread] and targets with (when N >= C) every class present."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(N, C, generator=g, dtype=torch.float64) * 2 - 1) * spread
    t = torch.randint(0, C, (N,), generator=g)
    if N >= C:
        t[:C] = torch.arange(C)
        t = t[torch.randperm(N, generator=g)]
    return x, t


def class_vec(C, lo, hi, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    return lo + (hi - lo) * torch.rand(C, generator=g, dtype=torch.float64)


def config(name, C):
    """Keyword arguments shared by the fused functional and the reference for a named configuration."""
    w = class_vec(C, 0.2, 2.5, 1)
    r = class_vec(C, 0.5, 1.8, 2)
    b = class_vec(C, -1.0, 1.0, 3)
    m = class_vec(C, 0.0, 0.6, 4)
    ts = class_vec(C, 5.0, 12.0, 5)
    table = {
        "plain": {},
        "scale": dict(scale=7.5),
        "weight": dict(weight=w),
        "col_scale": dict(col_scale=r, scale=3.0),
        "col_bias": dict(col_bias=b),
        "margin": dict(margin=m, scale=10.0),
        "target_scale": dict(target_scale=ts, margin=m),
        "kps_ga": dict(target_scale=ts, col_scale=r, margin=m, weight=w),
        "all": dict(scale=4.0, col_scale=r, col_bias=b, margin=m, weight=w),
        "smooth": dict(label_smoothing=0.15),
        "smooth_weight": dict(label_smoothing=0.3, weight=w, margin=m, scale=2.0),
        "smooth_one": dict(label_smoothing=1.0, weight=w),
        "focal_det_g0": dict(focal_gamma=0.0, focal_detach=True, weight=w),
        "focal_det_g05": dict(focal_gamma=0.5, focal_detach=True),
        "focal_det_g2": dict(focal_gamma=2.0, focal_detach=True, weight=w, margin=m, scale=3.0),
        "focal_full_g0": dict(focal_gamma=0.0, focal_detach=False),
        "focal_full_g05": dict(focal_gamma=0.5, focal_detach=False, weight=w),
        "focal_full_g2": dict(focal_gamma=2.0, focal_detach=False, col_scale=r, margin=m, scale=3.0),
    }
    return dict(table[name])


CONFIGS = ["plain", "scale", "weight", "col_scale", "col_bias", "margin", "target_scale", "kps_ga", "all",
           "smooth", "smooth_weight", "smooth_one", "focal_det_g0", "focal_det_g05", "focal_det_g2",
           "focal_full_g0", "focal_full_g05", "focal_full_g2"]


def to_dev(kw, device, dtype=None):
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def grad_out_for(loss, seed=7):
    """A non-uniform grad_output (so a backward that ignores grad_output fails)."""
    g = torch.Generator().manual_seed(seed)
    if loss.dim() == 0:
        return torch.tensor(1.7, dtype=loss.dtype, device=loss.device)
    return (0.25 + 2 * torch.rand(loss.shape, generator=g, dtype=torch.float64)).to(loss.device, loss.dtype)


def run(fn, x, t, kw, go=None):
    """Loss and d loss / d x (with a non-uniform grad_output) of fn(x, t, **kw)."""
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, t, **kw)
    if go is None:
        go = grad_out_for(loss)
    (g,) = torch.autograd.grad(loss, x, go.to(loss.dtype))
    return loss.detach(), g, go


def close_rel(actual, expected, rtol, what="", floor=0.0):
    """|a - e| <= rtol * (|e| + max|e| * 1e-3) + floor: relative per element, floored at a fraction of the
    scale (``floor``: an absolute term for values that cancel to ~0, e.g. p_y - 1 when p_y ~ 1)."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * 1e-3 * scale + floor + 1e-300, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def check_f32(l, l_ref, g, g_ref, kw, x, what=""):
    """float32 result vs the float64 reference at 1e-5 relative. Values that cancel to ~0 (the loss and
    p_y - 1 when p_y ~ 1, e.g. C = 1) get an absolute floor: 1e-7 (loss) / 1e-6 (grad) times the logit
    scale S * max r * max w * (1 + max|x|) (divided by N for the grad of a mean), a few fp32 ulps."""
    S = float(kw["target_scale"].max()) if kw.get("target_scale") is not None else float(kw.get("scale", 1.0))
    r = float(kw["col_scale"].max()) if kw.get("col_scale") is not None else 1.0
    w = float(kw["weight"].max()) if kw.get("weight") is not None else 1.0
    nat = S * r * w * (1.0 + float(x.abs().max()) if x.numel() else 1.0)
    n = max(1, x.shape[0]) if kw.get("reduction", "mean") in ("mean", "batch_mean") else 1
    close_rel(l, l_ref, 1e-5, f"{what} loss", floor=1e-7 * nat)
    close_rel(g, g_ref, 1e-5, f"{what} grad", floor=1e-6 * nat / n)


# ----------------------------------------------------------------------------------------------------------
# float64 parity: every configuration x reduction, values and grads to 1e-10
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", CONFIGS)
def test_float64_matches_reference(ltk_device, name, reduction):
    N, C = 13, 11
    x, t = make_inputs(N, C, seed=CONFIGS.index(name))
    kw = dict(config(name, C), reduction=reduction)
    l_ref, g_ref, go = run(ref, x, t, kw)
    l, g, _ = run(fused, x.to(ltk_device), t.to(ltk_device), to_dev(kw, ltk_device), go.to(ltk_device))
    assert l.dtype == torch.float64 and l.shape == l_ref.shape
    torch.testing.assert_close(l.cpu(), l_ref, **F64)
    torch.testing.assert_close(g.cpu(), g_ref, **F64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["plain", "weight", "smooth_weight", "focal_full_g2", "focal_det_g05", "all"])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_ignore_index_rows(ltk_device, name, reduction, ignore_index):
    N, C = 12, 6
    x, t = make_inputs(N, C, seed=5)
    t[[1, 4, 7]] = ignore_index  # with ignore_index=3 a valid class id is ignored (PyTorch semantics)
    kw = dict(config(name, C), reduction=reduction, ignore_index=ignore_index)
    l_ref, g_ref, go = run(ref, x, t, kw)
    l, g, _ = run(fused, x.to(ltk_device), t.to(ltk_device), to_dev(kw, ltk_device), go.to(ltk_device))
    torch.testing.assert_close(l.cpu(), l_ref, **F64)
    torch.testing.assert_close(g.cpu(), g_ref, **F64)
    ign = (t == ignore_index)
    assert torch.all(g.cpu()[ign] == 0)
    if reduction == "none":
        assert torch.all(l.cpu()[ign] == 0)


# functional.cross_entropy is the same kernel through the slim 7-argument op (test_cross_entropy.py).
# (300, 33): the CPU kernel splits the rows over threads (>= 4096 elements per task).
@pytest.mark.parametrize("functional", ["margin_cross_entropy", "cross_entropy"])
@pytest.mark.parametrize("shape", [(10, 7), (300, 33)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_torch_cross_entropy(ltk_device, functional, shape, reduction, smoothing, weighted):
    """The plain op is F.cross_entropy (incl. weight, ignore_index, label_smoothing)."""
    N, C = shape
    x, t = make_inputs(N, C, seed=11)
    t[2] = -100
    w = class_vec(C, 0.3, 2.0, 9) if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=smoothing)
    l_ref, g_ref, go = run(F.cross_entropy, x, t, kw)
    fn = getattr(LF, functional)
    l, g, _ = run(fn, x.to(ltk_device), t.to(ltk_device), to_dev(kw, ltk_device), go.to(ltk_device))
    torch.testing.assert_close(l.cpu(), l_ref, **F64)
    torch.testing.assert_close(g.cpu(), g_ref, **F64)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_all_rows_ignored(ltk_device, reduction):
    x, _ = make_inputs(4, 5)
    t = torch.full((4,), -100)
    expected = F.cross_entropy(x, t, reduction=reduction)  # NaN for mean (0 / 0), 0 for sum, zeros for none
    xd = x.to(ltk_device).requires_grad_(True)
    loss = fused(xd, t.to(ltk_device), reduction=reduction)
    torch.testing.assert_close(loss.detach().cpu(), expected, equal_nan=True, rtol=0, atol=0)
    if reduction == "mean":
        assert torch.isnan(loss)
    (g,) = torch.autograd.grad(loss.sum(), xd)
    xr = x.clone().requires_grad_(True)
    (g_exp,) = torch.autograd.grad(F.cross_entropy(xr, t, reduction=reduction).sum(), xr)
    torch.testing.assert_close(g.cpu(), g_exp, equal_nan=True, rtol=0, atol=0)


def test_zero_weight_total_is_nan_like_torch(ltk_device):
    x, t = make_inputs(6, 4)
    t[:] = torch.tensor([0, 1, 0, 1, 0, 1])
    w = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    expected = F.cross_entropy(x, t, weight=w)
    got = fused(x.to(ltk_device), t.to(ltk_device), weight=w.to(ltk_device))
    assert torch.isnan(expected) and torch.isnan(got.cpu())


# ----------------------------------------------------------------------------------------------------------
# row_shift / shift_coef (FBL's stimulus): value and gradient into row_shift
# ----------------------------------------------------------------------------------------------------------


def _ref_with_shift(x, t, row_shift, shift_coef, **kw):
    """Reference for t_i * beta_j added to row i before the per-class scale: feed x + t beta / r."""
    r = kw.get("col_scale")
    add = row_shift.unsqueeze(1) * shift_coef.unsqueeze(0)
    if r is not None:
        add = add / r
    return ref(x + add, t, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["plain", "weight", "all", "smooth_weight", "focal_full_g2", "focal_det_g05"])
def test_row_shift_value_and_grads(ltk_device, name, reduction):
    N, C = 9, 8
    x, t = make_inputs(N, C, seed=21)
    t[3] = -100
    kw = dict(config(name, C), reduction=reduction)
    rs = class_vec(N, -3.0, 1.0, 30)
    beta = class_vec(C, 0.0, 1.0, 31)

    xr = x.clone().requires_grad_(True)
    rsr = rs.clone().requires_grad_(True)
    l_ref = _ref_with_shift(xr, t, rsr, beta, **kw)
    go = grad_out_for(l_ref)
    gx_ref, grs_ref = torch.autograd.grad(l_ref, (xr, rsr), go)

    xf = x.to(ltk_device).requires_grad_(True)
    rsf = rs.to(ltk_device).requires_grad_(True)
    l = fused(xf, t.to(ltk_device), row_shift=rsf, shift_coef=beta.to(ltk_device), **to_dev(kw, ltk_device))
    gx, grs = torch.autograd.grad(l, (xf, rsf), go.to(ltk_device))
    torch.testing.assert_close(l.detach().cpu(), l_ref.detach(), **F64)
    torch.testing.assert_close(gx.cpu(), gx_ref, **F64)
    torch.testing.assert_close(grs.cpu(), grs_ref, **F64)


def test_row_shift_grad_only(ltk_device):
    """Gradient into row_shift when the logits themselves do not require grad."""
    N, C = 5, 6
    x, t = make_inputs(N, C, seed=3)
    rs = class_vec(N, -2.0, 2.0, 40)
    beta = class_vec(C, 0.0, 1.0, 41)
    rsr = rs.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(_ref_with_shift(x, t, rsr, beta), rsr)
    rsf = rs.to(ltk_device).requires_grad_(True)
    (g,) = torch.autograd.grad(fused(x.to(ltk_device), t.to(ltk_device), row_shift=rsf,
                                     shift_coef=beta.to(ltk_device)), rsf)
    torch.testing.assert_close(g.cpu(), g_ref, **F64)


# ----------------------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["plain", "weight", "all", "kps_ga", "smooth_weight", "focal_det_g2",
                                  "focal_full_g05", "margin"])
def test_float32_vs_float64_reference(ltk_device, name, reduction):
    N, C = 24, 37
    x, t = make_inputs(N, C, seed=2)
    t[5] = -100
    kw = dict(config(name, C), reduction=reduction)
    x32 = x.float()
    l_ref, g_ref, go = run(ref, x32.double(), t, kw)  # same (rounded) inputs, float64 math
    l, g, _ = run(fused, x32.to(ltk_device), t.to(ltk_device), to_dev(kw, ltk_device, torch.float32),
                  go.to(ltk_device))
    assert l.dtype == torch.float32 and g.dtype == torch.float32
    check_f32(l, l_ref, g, g_ref, kw, x32)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_float32_softmax_relative_accuracy_over_the_exp_range(ltk_device, scale):
    """Every softmax probability, down to e^-80 of the row max, to a few float32 ulps relative: the gradient of
    the summed loss is p - onehot (targets at the max, so the gradient is p off the target). Catches an exp
    that is accurate near 0 only, or a first-order coefficient off by 1e-4 (the AVX-512 exp measures 4.3e-7,
    ATen's exp_u20 of the other builds 20 ulp = 2.4e-6)."""
    N, C = 6, 997  # C % 16 != 0: the masked tail of each row too
    g = torch.Generator().manual_seed(11)
    gap = torch.rand(N, C, generator=g, dtype=torch.float64) * 80  # z_max - z_j in [0, 80]
    t = torch.randint(0, C, (N,), generator=g)
    gap[torch.arange(N), t] = 0
    x = (-gap / scale).float()
    kw = dict(scale=scale, reduction="sum")
    _, g_ref, go = run(ref, x.double(), t, kw)
    _, g32, _ = run(fused, x.to(ltk_device), t.to(ltk_device), kw, go.to(ltk_device))
    off = torch.ones(N, C, dtype=torch.bool)
    off[torch.arange(N), t] = False
    rel = ((g32.cpu().double() - g_ref) / g_ref)[off].abs()
    assert rel.max() < 5e-6, f"max relative error {rel.max():.3g} at p = {g_ref[off][rel.argmax()]:.3g}"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["plain", "weight", "all", "smooth_weight", "focal_full_g2", "focal_det_g05"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_within_precision(ltk_device, dtype, name, reduction):
    N, C = 16, 45
    x, t = make_inputs(N, C, seed=4, spread=3.0)
    t[0] = -100
    kw = dict(config(name, C), reduction=reduction)
    xh = x.to(dtype)
    l_ref, g_ref, go = run(ref, xh.double(), t, kw)
    l, g, _ = run(fused, xh.to(ltk_device), t.to(ltk_device), to_dev(kw, ltk_device), go.to(ltk_device, dtype))
    # output dtype follows F.cross_entropy for the same input dtype
    red = reduction if reduction != "batch_mean" else "sum"
    assert l.dtype == F.cross_entropy(xh, t, reduction=red).dtype == dtype
    assert g.dtype == dtype and l.shape == l_ref.shape
    eps = torch.finfo(dtype).eps
    # grad_output rounded to the half type: recompute the reference with that exact grad_output
    go_h = go.to(dtype).double()
    xr = xh.double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(ref(xr, t, **kw), xr, go_h)
    torch.testing.assert_close(l.double().cpu(), l_ref, rtol=2 * eps, atol=2 * eps * l_ref.abs().max().item())
    torch.testing.assert_close(g.double().cpu(), g_ref, rtol=2 * eps, atol=2 * eps * g_ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_output_dtype_like_cross_entropy(ltk_device, dtype, reduction):
    x, t = make_inputs(4, 5)
    x = x.to(dtype)
    out = fused(x.to(ltk_device), t.to(ltk_device), reduction=reduction)
    exp = F.cross_entropy(x, t, reduction=reduction)
    assert out.dtype == exp.dtype and out.shape == exp.shape


# ----------------------------------------------------------------------------------------------------------
# layouts, shapes
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["transposed", "col_slice", "row_slice", "expanded_weight"])
def test_non_contiguous_inputs(ltk_device, layout):
    N, C = 9, 10
    g = torch.Generator().manual_seed(17)
    w_base = class_vec(2 * C, 0.2, 2.0, 50)
    w = w_base[::2]  # non-contiguous per-class vector
    t_base = torch.randint(0, C, (N, 3), generator=g)
    t = t_base[:, 1]  # non-contiguous target
    if layout == "transposed":
        base = torch.randn(C, N, generator=g, dtype=torch.float64)
        view = lambda b: b.t()  # noqa: E731
    elif layout == "col_slice":
        base = torch.randn(N, 2 * C, generator=g, dtype=torch.float64)
        view = lambda b: b[:, 1::2]  # noqa: E731
    elif layout == "row_slice":
        base = torch.randn(3 * N, C + 3, generator=g, dtype=torch.float64)
        view = lambda b: b[::3, 2:-1]  # noqa: E731
    else:
        base = torch.randn(1, C, generator=g, dtype=torch.float64)
        view = lambda b: b.expand(N, C)  # noqa: E731 (stride 0 rows)
    kw = dict(weight=w, margin=class_vec(C, 0, 0.5, 51), scale=3.0, reduction="none")

    def go_for(loss):
        return grad_out_for(loss)

    br = base.clone().requires_grad_(True)
    l_ref = ref(view(br), t, **kw)
    go = go_for(l_ref)
    (g_ref,) = torch.autograd.grad(l_ref, br, go)
    bf = base.to(ltk_device).requires_grad_(True)
    xf = view(bf)
    assert not xf.is_contiguous()
    l = fused(xf, t.to(ltk_device), **to_dev(kw, ltk_device))
    (gf,) = torch.autograd.grad(l, bf, go.to(ltk_device))
    torch.testing.assert_close(l.detach().cpu(), l_ref.detach(), **F64)
    torch.testing.assert_close(gf.cpu(), g_ref, **F64)


SHAPES = [(1, 1), (6, 1), (1, 7), (1, 8142), (3, 8142), (4, 15), (4, 16), (4, 17), (5, 31), (5, 33), (3, 63),
          (3, 65), (64, 100), (2, 1000)]


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("N,C", SHAPES)
def test_shapes(ltk_device, N, C, reduction):
    x, t = make_inputs(N, C, seed=N * 7 + C)
    kw = dict(weight=class_vec(C, 0.5, 2.0, 60), margin=class_vec(C, 0.0, 0.4, 61), scale=5.0,
              col_scale=class_vec(C, 0.8, 1.2, 62), reduction=reduction)
    l_ref, g_ref, go = run(ref, x, t, kw)
    l, g, _ = run(fused, x.to(ltk_device), t.to(ltk_device), to_dev(kw, ltk_device), go.to(ltk_device))
    torch.testing.assert_close(l.cpu(), l_ref, **F64)
    torch.testing.assert_close(g.cpu(), g_ref, **F64)
    # float32 too (the vectorised path has tails for C not a multiple of the vector width)
    l_ref32, g_ref32, go = run(ref, x.float().double(), t, kw)
    l32, g32, _ = run(fused, x.float().to(ltk_device), t.to(ltk_device), to_dev(kw, ltk_device, torch.float32),
                      go.to(ltk_device))
    check_f32(l32, l_ref32, g32, g_ref32, kw, x, "f32")


# Outputs above 8 MiB are written with non-temporal stores (csrc/cpu/margin_ce_rows.h, kStreamOutputBytes):
# row starts at every 64-byte alignment (C % 16 != 0) and targets in the unaligned head, the streamed body
# and the tail of their rows. Linear rows write each row's gradient during the next row's exp pass, from a
# second scratch row: ignored rows (first, last, and a run across the middle, where the two threads' halves
# meet) check that a pending gradient survives them and lands in its own row; focal, weights, column scale
# (r) and label smoothing (D != 0) are the pipelined variants (FBL's row shift keeps the plain pass: next test).
@pytest.mark.parametrize("dtype,N,C", [(torch.float32, 260, 8142), (torch.float64, 131, 8143)])
@pytest.mark.parametrize("name", ["margin", "all", "smooth_weight", "focal_det_g2"])
def test_streamed_gradient_large_output(dtype, N, C, name):
    assert N * C * torch.finfo(dtype).bits // 8 > 8 << 20
    x, t = make_inputs(N, C, seed=N + C)
    t[: 3 * 17] = torch.tensor([0, 1, 5, 7, 13, 15, 16, 17, 31, 100, C - 1, C - 2, C - 9, C - 17, 4000, 4001,
                                4015] * 3)
    t[0] = t[-1] = -100
    t[N // 2 - 2: N // 2 + 2] = -100
    kw = config(name, C)
    l_ref, g_ref, go = run(ref, x.to(dtype).double(), t, kw)
    l, g, _ = run(fused, x.to(dtype), t, to_dev(kw, "cpu", dtype), go.to(dtype))
    if dtype == torch.float64:
        torch.testing.assert_close(l, l_ref, **F64)
        torch.testing.assert_close(g, g_ref, **F64)
    else:
        check_f32(l, l_ref, g, g_ref, kw, x.to(dtype), f"{name} streamed f32")


def test_streamed_gradient_with_row_shift():
    """A streamed fp32 output with FBL's row shift (the unpipelined pass 3, which also sums d loss / d t_i)."""
    N, C = 260, 8142
    x, t = make_inputs(N, C, seed=3)
    t[0] = t[N // 2] = -100
    kw = config("margin", C)
    rs, beta = class_vec(N, -3.0, 1.0, 30), class_vec(C, 0.0, 1.0, 31)
    x32 = x.float()
    xr, rsr = x32.double().requires_grad_(True), rs.clone().requires_grad_(True)
    l_ref = _ref_with_shift(xr, t, rsr, beta, **kw)
    gx_ref, grs_ref = torch.autograd.grad(l_ref, (xr, rsr))
    xf, rsf = x32.clone().requires_grad_(True), rs.float().requires_grad_(True)
    l = fused(xf, t, row_shift=rsf, shift_coef=beta.float(), **to_dev(kw, "cpu", torch.float32))
    gx, grs = torch.autograd.grad(l, (xf, rsf))
    check_f32(l.detach(), l_ref.detach(), gx, gx_ref, kw, x32, "streamed row shift")
    close_rel(grs, grs_ref, 1e-5, "streamed row shift d/dt")


def test_single_class(ltk_device):
    x = torch.tensor([[0.3], [-2.0], [5.0]], dtype=torch.float64)
    t = torch.zeros(3, dtype=torch.long)
    for red in ["none", "sum", "mean"]:
        xf = x.to(ltk_device).requires_grad_(True)
        loss = fused(xf, t.to(ltk_device), reduction=red, margin=torch.full((1,), 0.4, dtype=torch.float64,
                                                                             device=ltk_device), scale=3.0)
        exp = F.cross_entropy(x, t, reduction=red)  # exactly 0
        # the fused kernel shifts by the un-margined max, so ~1 ulp of the logits remains
        torch.testing.assert_close(loss.detach().cpu(), exp, rtol=0, atol=1e-13)
        (g,) = torch.autograd.grad(loss.sum(), xf)
        torch.testing.assert_close(g.cpu(), torch.zeros_like(x), rtol=0, atol=1e-13)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_empty_batch(ltk_device, reduction, weighted):
    C = 5
    x = torch.zeros(0, C, dtype=torch.float64)
    t = torch.zeros(0, dtype=torch.long)
    w = class_vec(C, 0.5, 1.5, 70) if weighted else None
    if reduction == "batch_mean":
        expected = ref(x, t, weight=w, reduction=reduction)  # sum / N = 0 / 0
    else:
        expected = F.cross_entropy(x, t, weight=w, reduction=reduction)
    xf = x.to(ltk_device).requires_grad_(True)
    loss = fused(xf, t.to(ltk_device), weight=None if w is None else w.to(ltk_device), reduction=reduction)
    assert loss.shape == expected.shape and loss.dtype == expected.dtype
    torch.testing.assert_close(loss.detach().cpu(), expected, equal_nan=True, rtol=0, atol=0)
    (g,) = torch.autograd.grad(loss.sum(), xf)
    assert g.shape == (0, C)


# ----------------------------------------------------------------------------------------------------------
# gradcheck, opcheck, compile
# ----------------------------------------------------------------------------------------------------------

GRADCHECK = {
    "plain_mean": dict(),
    "weight_mean_ignore": dict(weight=class_vec(5, 0.3, 2.0, 80), _ignore=True),
    "vectors_sum": dict(scale=3.0, col_scale=class_vec(5, 0.5, 1.5, 81), col_bias=class_vec(5, -1, 1, 82),
                        margin=class_vec(5, 0, 0.5, 83), reduction="sum"),
    "target_scale_none": dict(target_scale=class_vec(5, 2, 6, 84), margin=class_vec(5, 0, 0.5, 85),
                              reduction="none"),
    "focal_full_g2": dict(focal_gamma=2.0, focal_detach=False, weight=class_vec(5, 0.3, 2.0, 86)),
    "focal_full_g05": dict(focal_gamma=0.5, focal_detach=False, reduction="none"),
    "smoothing_weight": dict(label_smoothing=0.2, weight=class_vec(5, 0.3, 2.0, 87)),
    "smoothing_batch_mean": dict(label_smoothing=0.4, reduction="batch_mean"),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck(ltk_device, name):
    kw = dict(GRADCHECK[name])
    x, t = make_inputs(4, 5, seed=90)
    if kw.pop("_ignore", False):
        t[1] = -100
    x = x.to(ltk_device).requires_grad_(True)
    kw = to_dev(kw, ltk_device)
    assert torch.autograd.gradcheck(lambda inp: fused(inp, t.to(ltk_device), **kw), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck_row_shift(ltk_device, reduction):
    x, t = make_inputs(4, 5, seed=91)
    x = x.to(ltk_device).requires_grad_(True)
    rs = class_vec(4, -2, 1, 92).to(ltk_device).requires_grad_(True)
    beta = class_vec(5, 0, 1, 93).to(ltk_device)
    w = class_vec(5, 0.3, 2.0, 94).to(ltk_device)
    assert torch.autograd.gradcheck(
        lambda inp, s: fused(inp, t.to(ltk_device), row_shift=s, shift_coef=beta, weight=w, reduction=reduction),
        (x, rs), eps=1e-6, atol=1e-7)


def _op_args(device, N=4, C=6, requires_grad=True, **over):
    x, t = make_inputs(N, C, seed=95)
    a = dict(input=x.to(device).requires_grad_(requires_grad), target=t.to(device), compute_grad=requires_grad)
    a.update(over)
    return tuple(_ops.margin_ce_arguments(kwargs=a).values())  # every argument, the schema's defaults


def _opcheck_cases(device, C=6, N=4):
    v = lambda lo, hi, s: class_vec(C, lo, hi, s).to(device)  # noqa: E731
    return {
        "plain_none": dict(reduction=0),
        "weight_sum": dict(reduction=1, weight=v(0.3, 2, 1)),
        "vectors_batch_mean": dict(reduction=3, col_scale=v(0.5, 1.5, 2), col_bias=v(-1, 1, 3), margin=v(0, .5, 4),
                                   scale=4.0),
        "target_scale_focal_full": dict(target_scale=v(2, 5, 5), focal=2, gamma=2.0, reduction=3),
        "smoothing_ignore": dict(label_smoothing=0.1, ignore_index=2, weight=v(0.3, 2, 6)),
        "row_shift": dict(row_shift=class_vec(N, -1, 1, 7).to(device).requires_grad_(True), shift_coef=v(0, 1, 8)),
        "cloud_noise": dict(cloud=v(0, 1, 9), noise=(torch.randn(N, C, dtype=torch.float64) / 3).to(device),
                            scale=30.0, margin=v(0, .5, 10)),
        "cloud_seed": dict(cloud=v(0, 1, 11), seed=torch.tensor([12345], dtype=torch.int64), offset=3, scale=20.0),
        "arcface": dict(angular=1, margin=v(0.3, 0.5, 12), scale=16.0),
        "gclang_seed": dict(angular=3, cloud=v(0, 1, 13), seed=torch.tensor([7], dtype=torch.int64), angular_eps=0.1,
                            margin=v(0.1, 0.2, 14), scale=8.0),
        "no_grad": dict(_no_grad=True),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases("cpu")))
def test_opcheck(ltk_device, case):
    over = dict(_opcheck_cases(ltk_device)[case])
    rg = not over.pop("_no_grad", False)
    args = _op_args(ltk_device, requires_grad=rg, **over)
    torch.library.opcheck(ops.margin_ce.default, args)


@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per_row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_grad_scale_op(ltk_device, per_row, dtype):
    """margin_ce's backward op scales the saved gradient in place by grad_output (a scalar, or one value per
    row for reduction='none'): the same as the out-of-place multiply, including a grad_output of another
    dtype and N = 0; opcheck covers its schema, fake kernel and aliasing."""
    for N, C in ((5, 7), (0, 4)):
        g = torch.randn(N, C, generator=torch.Generator().manual_seed(N)).to(ltk_device, dtype)
        go = (torch.rand(N) + 0.5 if per_row else torch.tensor(1.7)).to(ltk_device, torch.float32)
        want = g.float() * (go.unsqueeze(1) if per_row else go)
        out = g.clone()
        ops.margin_ce_grad_scale_(out, go, per_row)
        # bf16: the product rounded once to bf16, and grad_output possibly rounded to it first (CUDA): 2 x 2^-8
        tol = dict(rtol=2 ** -7, atol=0) if dtype == torch.bfloat16 else F64 if dtype == torch.float64 else \
            dict(rtol=1e-6, atol=0)
        torch.testing.assert_close(out.float(), want, **tol)
        torch.library.opcheck(ops.margin_ce_grad_scale_.default, (g.clone(), go.to(dtype), per_row))


def test_grad_scale_op_bad_input():
    g = torch.randn(4, 3)
    bad = [
        ((torch.randn(4, 3, 2), torch.tensor(1.0), False), "contiguous \\(N, C\\)"),
        ((torch.randn(3, 4).t(), torch.tensor(1.0), False), "contiguous \\(N, C\\)"),
        ((g.clone(), torch.ones(2), False), "must be a scalar"),
        ((g.clone(), torch.ones(3), True), "shape \\(N,\\) = \\(4,\\)"),
        ((g.clone(), torch.ones(4, 1), True), "shape \\(N,\\) = \\(4,\\)"),
        ((torch.ones(4, 3, dtype=torch.int64), torch.tensor(2), False), "floating-point"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            ops.margin_ce_grad_scale_(*args)
        with pytest.raises(Exception, match=msg.split("\\")[0]):  # the fake kernel agrees (tracing)
            with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
                ops.margin_ce_grad_scale_(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_compile_fullgraph_functional(ltk_device, reduction):
    torch._dynamo.reset()
    N, C = 6, 9
    x, t = make_inputs(N, C, seed=96)
    w = class_vec(C, 0.3, 2, 97).to(ltk_device)
    m = class_vec(C, 0, 0.5, 98).to(ltk_device)
    beta = class_vec(C, 0, 1, 99).to(ltk_device)

    def f(inp, tgt, rs):
        a = LF.margin_cross_entropy(inp, tgt, scale=5.0, margin=m, weight=w, reduction=reduction,
                                    row_shift=rs, shift_coef=beta)
        b = LF.margin_cross_entropy(inp, tgt, focal_gamma=2.0, focal_detach=False, margin=0.2,
                                    reduction=reduction)
        return a + 0.5 * b

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs = [x.to(ltk_device).requires_grad_(True) for _ in range(2)]
    rss = [class_vec(N, -1, 1, 100).to(ltk_device).requires_grad_(True) for _ in range(2)]
    le, lc = f(xs[0], t.to(ltk_device), rss[0]), cf(xs[1], t.to(ltk_device), rss[1])
    go = grad_out_for(le)
    ge = torch.autograd.grad(le, (xs[0], rss[0]), go)
    gc = torch.autograd.grad(lc, (xs[1], rss[1]), go)
    torch.testing.assert_close(lc, le, rtol=0, atol=0)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


def test_compile_inductor_tiny(ltk_device):
    """Default backend (inductor) on a tiny shape: compiles, runs the fused op, same value and grad."""
    torch._dynamo.reset()
    x, t = make_inputs(3, 5, seed=101)
    x = x.float().to(ltk_device)
    m = class_vec(5, 0, 0.5, 102).float().to(ltk_device)

    def f(inp, tgt):
        return LF.margin_cross_entropy(inp * 1.0, tgt, scale=4.0, margin=m)

    cf = torch.compile(f, fullgraph=True)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    l1, l2 = f(x1, t.to(ltk_device)), cf(x2, t.to(ltk_device))
    (g1,) = torch.autograd.grad(l1, x1)
    (g2,) = torch.autograd.grad(l2, x2)
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g2, g1, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# NaN / inf, no-grad path
# ----------------------------------------------------------------------------------------------------------

_INF = float("inf")
_NAN = float("nan")


def _nan_inf_input(cases, C=5):
    x, _ = make_inputs(len(cases) + 2, C, seed=103)
    t = torch.tensor([c[0] for c in cases] + [1, 2])
    for i, (_, col, v) in enumerate(cases):
        x[i, col] = v
    return x, t


def _assert_rows_like_cross_entropy(x, t, device, **tol):
    """Per-row losses and their gradient equal F.cross_entropy's, NaN where it gives NaN."""
    xr = x.clone().requires_grad_(True)
    exp = F.cross_entropy(xr, t, reduction="none")
    (g_exp,) = torch.autograd.grad(exp.sum(), xr)
    xf = x.to(device).requires_grad_(True)
    got = fused(xf, t.to(device), reduction="none")
    (g,) = torch.autograd.grad(got.sum(), xf)
    torch.testing.assert_close(got.detach().cpu(), exp.detach(), equal_nan=True, **tol)
    torch.testing.assert_close(g.cpu(), g_exp, equal_nan=True, **tol)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nan_and_neg_inf_propagate_like_cross_entropy(ltk_device, reduction):
    # (target, column, value): NaN at a non-target / at the target, -inf at a non-target / at the target
    cases = [(0, 3, _NAN), (2, 2, _NAN), (1, 4, -_INF), (3, 3, -_INF)]
    x, t = _nan_inf_input(cases)
    exp = F.cross_entropy(x, t, reduction=reduction)
    xf = x.to(ltk_device).requires_grad_(True)
    got = fused(xf, t.to(ltk_device), reduction=reduction)
    torch.testing.assert_close(got.detach().cpu(), exp, equal_nan=True, rtol=1e-12, atol=1e-12)
    if reduction == "none":
        assert torch.isnan(got[:2]).all() and torch.isinf(got[3]) and torch.isfinite(got[4:]).all()
        xr = x.clone().requires_grad_(True)
        (g_exp,) = torch.autograd.grad(F.cross_entropy(xr, t, reduction="none").sum(), xr)
        (g,) = torch.autograd.grad(got.sum(), xf)
        torch.testing.assert_close(g.cpu(), g_exp, equal_nan=True, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_inf_in_wide_rows_like_cross_entropy(ltk_device, dtype):
    """C = 150: pass 1 keeps four max accumulators over blocks of four vectors, then single vectors and a
    masked tail; a NaN / +inf / -inf in a column of each part reaches the loss and gradient as in PyTorch."""
    cols = [5, 12, 20, 28, 37, 50, 70, 130, 149]  # every accumulator (fp32: 16 columns each, fp64: 8), remainder, tail
    cases = [(0, c, v) for c in cols for v in (_NAN, _INF, -_INF)]
    x, t = _nan_inf_input(cases, C=150)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else F64
    _assert_rows_like_cross_entropy(x.to(dtype), t, ltk_device, **tol)


@pytest.mark.parametrize("case", ["pinf_nontarget", "pinf_target"])
def test_pos_inf_logits_propagate_like_cross_entropy(ltk_device, case):
    """+inf logits: F.cross_entropy gives NaN for that row's loss and NaN for its whole gradient row."""
    cases = [(0, 3, _INF)] if case == "pinf_nontarget" else [(0, 0, _INF)]
    x, t = _nan_inf_input(cases)
    _assert_rows_like_cross_entropy(x, t, ltk_device, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["plain", "all", "smooth_weight", "focal_full_g2", "focal_det_g05"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_no_grad_path_same_loss(ltk_device, name, reduction):
    x, t = make_inputs(10, 12, seed=104)
    kw = to_dev(dict(config(name, 12), reduction=reduction), ltk_device)
    x, t = x.to(ltk_device), t.to(ltk_device)
    with_grad = fused(x.clone().requires_grad_(True), t, **kw)
    no_req = fused(x, t, **kw)
    with torch.no_grad():
        in_no_grad = fused(x.clone().requires_grad_(True), t, **kw)
    assert no_req.grad_fn is None and in_no_grad.grad_fn is None and with_grad.grad_fn is not None
    assert torch.equal(no_req, with_grad.detach()) and torch.equal(in_no_grad, with_grad.detach())
    torch.testing.assert_close(no_req.cpu(), ref(x.cpu(), t.cpu(), **to_dev(kw, "cpu")), **F64)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_full_gradient_at_zero_loss(ltk_device, gamma):
    """Non-detached focal at a row loss of exactly 0 (C = 1): d/dl [(1 - e^-l)^g l] -> 0 as l -> 0 for any
    g > 0, so the gradient is 0 (not NaN from 0 * inf)."""
    x = torch.tensor([[0.3], [-1.0]], dtype=torch.float64, device=ltk_device, requires_grad=True)
    t = torch.zeros(2, dtype=torch.long, device=ltk_device)
    loss = fused(x, t, focal_gamma=gamma, focal_detach=False, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0
    assert torch.equal(g.cpu(), torch.zeros(2, 1, dtype=torch.float64))


def test_reference_focal_full_gradient_at_zero_loss():
    """Library bug in the oracle (ltkernels/reference.py, focal_detach=False, 0 < gamma < 1): at a row loss of
    exactly 0 (C = 1, or a saturated softmax) autograd through (1 - p)^gamma gives 0 * inf = NaN; the true
    gradient is 0 (the fused kernel returns 0, see test_focal_full_gradient_at_zero_loss)."""
    x = torch.tensor([[0.3], [-1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.zeros(2, dtype=torch.long)
    (g,) = torch.autograd.grad(ref(x, t, focal_gamma=0.5, focal_detach=False, reduction="sum"), x)
    assert torch.equal(g, torch.zeros(2, 1, dtype=torch.float64)), g


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_backward_twice_with_retain_graph(ltk_device, reduction):
    """Two backward passes through one graph (retain_graph=True, as gradcheck and many training loops do)
    give the same gradient, like F.cross_entropy."""
    x, t = make_inputs(5, 6, seed=106)
    xf = x.to(ltk_device).requires_grad_(True)
    loss = fused(xf, t.to(ltk_device), margin=0.2, scale=3.0, reduction=reduction)
    go = grad_out_for(loss)
    (g1,) = torch.autograd.grad(loss, xf, go, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, xf, go, retain_graph=True)
    g1c = g1.clone()
    loss.backward(go)
    torch.testing.assert_close(g2, g1c, rtol=0, atol=0)
    torch.testing.assert_close(xf.grad, g1c, rtol=0, atol=0)
    xr = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(ref(xr, t, margin=0.2, scale=3.0, reduction=reduction), xr, go.cpu())
    torch.testing.assert_close(g1c.cpu(), g_ref, **F64)


def test_int32_and_uint8_targets_accepted(ltk_device):
    x, t = make_inputs(6, 4, seed=105)
    exp = fused(x.to(ltk_device), t.to(ltk_device))
    for dt in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(fused(x.to(ltk_device), t.to(dt).to(ltk_device)), exp, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------


def test_target_out_of_range_raises_index_error():
    x, t = make_inputs(4, 5)
    for bad in (5, 17, -1, -101):
        tb = t.clone()
        tb[2] = bad
        with pytest.raises(IndexError, match=rf"target {bad} .*out of range"):
            fused(x, tb)
        with pytest.raises(IndexError, match="out of range"):
            fused(x, tb, ignore_index=3)
    # the ignore value itself is fine, also when it is a valid class
    t2 = t.clone()
    t2[2] = -100
    fused(x, t2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bool, torch.complex64])
def test_non_integer_target_raises_type_error(dtype):
    x, t = make_inputs(4, 5)
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        fused(x, t.to(dtype))


def test_shape_mismatches_raise():
    x, t = make_inputs(4, 5)
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        fused(x, t[:3])
    with pytest.raises(ValueError, match=r"target must have shape"):
        fused(x, t.view(2, 2))
    with pytest.raises(ValueError, match="2-D"):
        fused(x[0], t[:1])
    with pytest.raises(ValueError, match="2-D"):
        fused(x.view(2, 2, 5), t)
    with pytest.raises(TypeError, match="floating-point"):
        fused(x.long(), t)
    with pytest.raises(ValueError, match="0 classes"):
        fused(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="noise must have the input's shape"):
        fused(x, t, cloud=torch.ones(5), noise=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="row_shift must be a 1-D tensor of length 4"):
        fused(x, t, row_shift=torch.ones(5), shift_coef=torch.ones(5))
    with pytest.raises(ValueError, match="together"):
        fused(x, t, row_shift=torch.ones(4))


@pytest.mark.parametrize("name", [v for v, length in _ops.MARGIN_CE_VECTORS.items() if length == "C"])
def test_per_class_vector_wrong_length_or_device(name):
    x, t = make_inputs(4, 5)
    extra = {"shift_coef": dict(row_shift=torch.zeros(4, dtype=torch.float64))}.get(name, {})
    for bad_len in (4, 6, 1):
        with pytest.raises(ValueError, match=rf"{name} must be a 1-D tensor of length 5"):
            fused(x, t, **{name: torch.ones(bad_len, dtype=torch.float64)}, **extra)
    with pytest.raises(ValueError, match=rf"{name} must be a 1-D tensor of length 5"):
        fused(x, t, **{name: torch.ones(1, 5, dtype=torch.float64)}, **extra)
    with pytest.raises(ValueError, match=rf"{name} is on meta but the input is on cpu"):
        fused(x, t, **{name: torch.ones(5, dtype=torch.float64, device="meta")}, **extra)


def test_device_mismatch_of_target_and_op_level_checks():
    x, t = make_inputs(4, 5)
    with pytest.raises(ValueError, match="target is on meta"):
        fused(x, t.to("meta"))
    # the op itself checks too (for callers that bypass the functional)
    args = list(_op_args("cpu", requires_grad=False))
    bad = list(args)
    bad[ARG["margin"]] = torch.ones(3, dtype=torch.float64)  # margin of the wrong length
    with pytest.raises(ValueError, match=r"margin must have shape \(C,\)"):
        ops.margin_ce(*bad)
    bad = list(args)
    bad[ARG["target"]] = args[ARG["target"]].to(torch.int32)
    with pytest.raises(ValueError, match="target must be int64"):
        ops.margin_ce(*bad)
    bad = list(args)
    bad[ARG["reduction"]] = 9  # reduction code
    with pytest.raises(ValueError, match="unknown reduction"):
        ops.margin_ce(*bad)
    bad = list(args)
    bad[ARG["target"]] = args[ARG["target"]].clone()
    bad[ARG["target"]][0] = 6
    with pytest.raises(IndexError, match="out of range"):
        ops.margin_ce(*bad)
    bad = list(args)
    bad[ARG["cloud"]] = torch.ones(6, dtype=torch.float64)  # cloud without noise or seed
    with pytest.raises(ValueError, match="needs either injected noise or a seed"):
        ops.margin_ce(*bad)


def test_bad_options_raise():
    x, t = make_inputs(4, 5)
    with pytest.raises(ValueError, match="focal loss and label smoothing cannot be combined"):
        fused(x, t, focal_gamma=1.0, label_smoothing=0.1)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused(x, t, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused(x, t, reduction="elementwise_mean")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        fused(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        fused(x, t, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="focal_gamma must be >= 0"):
        fused(x, t, focal_gamma=-1.0)
    with pytest.raises(ValueError, match="angular must be one of"):
        fused(x, t, angular="sphereface")
    with pytest.raises(TypeError, match="must be tensors"):
        fused(x.tolist(), t)


@pytest.mark.parametrize("angular", ["arcface", "arcface_easy", "gclang", "gclang_easy"])
def test_linear_vectors_with_an_angular_mode_raise(angular):
    """A class scale, bias or row shift has no place in cos(theta + M): refused (the CPU and CUDA kernels once
    disagreed on it silently), in eager mode and by the fake kernel alike."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, t = make_inputs(4, 5, spread=1.0)
    kw = dict(angular=angular, angular_eps=0.1, cloud=class_vec(5, 0, 1, 2), seed=torch.tensor([3]))
    bad = [dict(col_scale=class_vec(5, 0.5, 1.5, 1)), dict(col_bias=class_vec(5, -1, 1, 1)),
           dict(row_shift=torch.rand(4, dtype=torch.float64), shift_coef=class_vec(5, -1, 0, 1))]
    for extra in bad:
        with pytest.raises(ValueError, match="apply to the linear transform only"):
            fused(x, t, **kw, **extra)
    fused(x, t, **kw, target_scale=class_vec(5, 10, 20, 3))  # a per-row scale is fine
    a = _ops.margin_ce_arguments((x, t), dict(scale=1.0, angular=_ops.ANGULAR[angular], col_scale=class_vec(5, 0.5, 1.5, 1)))
    with pytest.raises(Exception, match="apply to the linear transform only"):  # the fake kernel agrees (tracing)
        with FakeTensorMode() as mode:
            ops.margin_ce(*(mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in a.values()))


# ----------------------------------------------------------------------------------------------------------
# both CPU instruction-set builds
# ----------------------------------------------------------------------------------------------------------


def isa_parity_check() -> dict:
    """Run in a subprocess with ATEN_CPU_CAPABILITY set: parity of a subset against the reference in that
    process's ISA build; returns the ISA name and in-kernel-noise losses for cross-process comparison."""
    for name in ["plain", "all", "smooth_weight", "focal_full_g05", "focal_det_g2"]:
        for reduction in ["none", "mean"]:
            for N, C in [(7, 1), (9, 13), (4, 33), (3, 1000)] + ([(260, 8142)] if name == "all" else []):
                if C == 1 and name == "focal_full_g05":
                    continue  # the reference's gradient is NaN there (test_reference_focal_full_..._BUG)
                x, t = make_inputs(N, C, seed=N + C)
                t[0] = -100
                kw = dict(config(name, C), reduction=reduction)
                l_ref, g_ref, go = run(ref, x, t, kw)
                l, g, _ = run(fused, x, t, kw, go)
                torch.testing.assert_close(l, l_ref, **F64)
                torch.testing.assert_close(g, g_ref, **F64)
                x32 = x.float()
                l_ref, g_ref, go = run(ref, x32.double(), t, kw)
                l, g, _ = run(fused, x32, t, to_dev(kw, "cpu", torch.float32), go)
                check_f32(l, l_ref, g, g_ref, kw, x32, f"{name} {reduction} {N}x{C} f32")
                xb = x.bfloat16()
                l_ref, g_ref, go = run(ref, xb.double(), t, kw)
                l, g, _ = run(fused, xb, t, kw, go.bfloat16())
                eps = torch.finfo(torch.bfloat16).eps
                torch.testing.assert_close(l.double(), l_ref, rtol=2 * eps,
                                           atol=2 * eps * l_ref.abs().max().item() + 1e-6)
    return {"isa": ops.cpu_isa(), "gcl": cloud_values()}


def cloud_values() -> dict:
    """Losses and grads with the in-kernel Philox cloud (linear, ArcFace, GCLAng modes), float64."""
    # C = 150: 37 groups of four, so the AVX-512 generator's 16-group vector body is compared too
    x, t = make_inputs(6, 150, seed=3, spread=1.0)
    out = {}
    for angular in ["linear", "arcface", "gclang"]:
        xr = x.clone().requires_grad_(True)
        loss = fused(xr, t, scale=10.0, margin=0.3, cloud=class_vec(150, 0, 1, 9), seed=torch.tensor([987654321]),
                     offset=5, angular=angular, angular_eps=0.1, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), xr)
        out[angular] = [loss.tolist(), g.flatten().tolist()]
    return out


def test_cpu_isa_builds_in_subprocess():
    """Both other instruction-set builds (forced with ATEN_CPU_CAPABILITY, read at first use) report their
    name and pass a parity subset; run concurrently in two subprocesses to keep the wall time down."""
    mine, results = run_on_other_isas("test_margin_ce", "isa_parity_check", cloud_values)
    for isa, (_, res) in results.items():
        assert res["isa"] == isa
        # the in-kernel noise is ISA-independent: same perturbation, float64 math agrees to rounding
        for angular, (loss, grad) in mine.items():
            torch.testing.assert_close(torch.tensor(res["gcl"][angular][0]), torch.tensor(loss), rtol=1e-12,
                                       atol=1e-12, msg=lambda m: f"[{isa} {angular} loss] {m}")
            torch.testing.assert_close(torch.tensor(res["gcl"][angular][1]), torch.tensor(grad), rtol=1e-12,
                                       atol=1e-12, msg=lambda m: f"[{isa} {angular} grad] {m}")


def test_cpu_isa_reports_known_name():
    assert ops.cpu_isa() in ("avx512", "avx2", "default")
    flags = cpu_flags()
    if not os.environ.get("ATEN_CPU_CAPABILITY") and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        assert ops.cpu_isa() == "avx512"


def test_second_derivative_refused_not_silently_missing():
    """create_graph=True through the fused loss raises: its backward scales a gradient the forward computed,
    whose own derivative w.r.t. the input would otherwise be missing without a word. First-order gradients
    and create_graph=False are unaffected; the eager reference differentiates twice."""
    x, t = make_inputs(4, 6, seed=1)
    x = x.double().requires_grad_(True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(fused(x, t, scale=5.0), x, create_graph=True)
    (g,) = torch.autograd.grad(fused(x, t, scale=5.0), x)
    (g_ref,) = torch.autograd.grad(ref(x, t, scale=5.0), x, create_graph=True)
    torch.testing.assert_close(g, g_ref.detach(), rtol=1e-10, atol=1e-12)
    g_ref.square().sum().backward()  # the reference has the second derivative
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unit_grad_output_fast_path_reads_logical_value():
    """backward() with a plain CPU 1 returns the forward's gradient as is; a grad_output whose memory holds
    1 but whose value is not (a negation view) or that has no memory (an efficient zero tensor) must
    take the scaling path."""
    x, t = make_inputs(4, 6, seed=2)
    x = x.double().requires_grad_(True)
    (g_one,) = torch.autograd.grad(fused(x, t, scale=3.0), x, torch.tensor(1.0, dtype=torch.float64))
    (g_neg,) = torch.autograd.grad(fused(x, t, scale=3.0), x, torch._neg_view(torch.tensor(1.0, dtype=torch.float64)))
    torch.testing.assert_close(g_neg, -g_one, rtol=0, atol=0)
    (g_zero,) = torch.autograd.grad(fused(x, t, scale=3.0), x, torch._efficientzerotensor((), dtype=torch.float64))
    assert torch.equal(g_zero, torch.zeros_like(g_one))


@pytest.mark.parametrize("variant", ["focal", "smoothing"])
def test_functional_packs_every_argument_in_schema_order(monkeypatch, variant):
    """margin_cross_entropy calls the op positionally (a keyword call costs ~1 us): every value must land in
    the schema slot of its name. A fake op records the call; each argument gets a value no other one has."""
    seen = {}

    def fake_op(*args):
        seen.update(_ops.margin_ce_arguments(args))
        return torch.zeros(()), torch.zeros(0), torch.zeros(0)

    monkeypatch.setattr(LF, "_MARGIN_CE", fake_op)
    n, c = 3, 5
    x = torch.rand(n, c, requires_grad=True)
    t = torch.tensor([0, 1, 4])
    vectors = {name: torch.rand(n if dim == "N" else c) for name, dim in _ops.MARGIN_CE_VECTORS.items()}
    noise, seed = torch.rand(n, c), torch.tensor([12345], dtype=torch.int64)
    extra = dict(focal_gamma=2.5, focal_detach=False) if variant == "focal" else dict(label_smoothing=0.125)
    LF.margin_cross_entropy(x, t, scale=1.5, noise_mul=2.25, angular_eps=0.375, offset=7, angular="gclang",
                            reduction="sum", ignore_index=-7, noise=noise, seed=seed, **vectors, **extra)
    assert seen["input"] is x and torch.equal(seen["target"], t)
    for name, v in vectors.items():
        assert seen[name] is v, name
    assert seen["noise"] is noise and seen["seed"] is seed
    want = dict(scale=1.5, noise_mul=2.25, angular_eps=0.375, offset=7, angular=_ops.ANGULAR["gclang"],
                reduction=_ops.REDUCTIONS["sum"], ignore_index=-7, compute_grad=True,
                focal=_ops.FOCAL_FULL if variant == "focal" else _ops.FOCAL_OFF,
                gamma=2.5 if variant == "focal" else 0.0, label_smoothing=0.0 if variant == "focal" else 0.125)
    assert {k: seen[k] for k in want} == want
