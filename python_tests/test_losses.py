"""Every fused module of ``ltkernels.losses`` against its eager twin in ``ltkernels.reference`` built with the
same constructor arguments (the official call sites of docs/methods.md included): float64 values and gradients
to 1e-10, float32 to 1e-5 relative, injected GCL noise, ArcFace/GCLAng at |c| = 1, FBL gradients into the
features (zero feature row included), degenerate class counts, torch.compile(fullgraph=True), .to() moves
and state_dict keys.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import devices  # noqa: F401  (the ltk_device fixture iterates over it)

from ltkernels import functional as LF
from ltkernels import losses as L
from ltkernels import priors as P
from ltkernels import reference as R

F64 = dict(rtol=1e-10, atol=1e-10)


def cifar_counts(C=10, n_max=5000, imb=100):
    """CIFAR-LT counts (docs/methods.md §7): n_i = int(n_max (1/IF)^(i/(C-1)))."""
    return [int(n_max * (1.0 / imb) ** (i / (C - 1))) for i in range(C)]


COUNTS = cifar_counts()
C = len(COUNTS)
SHUFFLED = [COUNTS[i] for i in (3, 0, 7, 9, 1, 5, 2, 8, 4, 6)]  # not sorted: KPS thesis vs code differ
CB_W = P.class_balanced_weights(COUNTS, 0.9999)
DRW_W = P.drw_weights(COUNTS, epoch=170)  # LDAM-DRW after the switch at epoch 160


def _per_class(lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(C, generator=g, dtype=torch.float64)


# name -> (constructor args, input kind). Input kinds: "cos" (cosines in (-1, 1)), "logit" (raw logits),
# "gcl" (cosines + injected noise), "fbl" (logits + features + curr).
CASES = {
    "ce_plain": ("CrossEntropyLoss", dict(), "logit"),
    "ce_weight_smooth_ignore": ("CrossEntropyLoss", dict(weight=CB_W, label_smoothing=0.1, ignore_index=2),
                                "logit"),
    "ce_sum": ("CrossEntropyLoss", dict(reduction="sum"), "logit"),
    "ce_none": ("CrossEntropyLoss", dict(reduction="none", weight=CB_W), "logit"),
    "ldam": ("LDAMLoss", dict(cls_num_list=COUNTS), "cos"),
    "ldam_drw": ("LDAMLoss", dict(cls_num_list=COUNTS, max_m=0.5, s=30, weight=DRW_W), "cos"),
    "ldam_drw_epoch0": ("LDAMLoss", dict(cls_num_list=COUNTS, weight=P.drw_weights(COUNTS, epoch=0)), "cos"),
    "kps_cifar": ("KPSLoss", dict(cls_num_list=COUNTS, max_m=0.2, s=15), "cos"),
    "kps_cifar_ga": ("KPSLoss", dict(cls_num_list=COUNTS, max_m=0.2, s=15, weighted=True), "cos"),
    "kps_weighted_weight": ("KPSLoss", dict(cls_num_list=SHUFFLED, weighted=True, weight=CB_W), "cos"),
    "kps_flip_compat": ("KPSLoss", dict(cls_num_list=SHUFFLED, max_m=0.2, s=15, flip_compat=True), "cos"),
    "kps_flip_compat_ga": ("KPSLoss", dict(cls_num_list=SHUFFLED, s=40, weighted=True, flip_compat=True), "cos"),
    "la": ("LogitAdjustLoss", dict(cls_num_list=COUNTS), "logit"),
    "la_tau_weight": ("LogitAdjustLoss", dict(cls_num_list=SHUFFLED, tau=1.5, weight=CB_W), "logit"),
    "bs": ("BalancedSoftmaxLoss", dict(cls_num_list=COUNTS), "logit"),
    "cosface": ("CosFaceLoss", dict(s=64.0, m=0.4), "cos"),
    "cosface_per_class": ("CosFaceLoss", dict(s=30.0, m=_per_class(0.1, 0.5, 1)), "cos"),
    "focal_ldam_drw": ("FocalLoss", dict(gamma=1.0, detach=False), "logit"),
    "focal_detached_weight": ("FocalLoss", dict(weight=CB_W, gamma=2.0, detach=True), "logit"),
    "focal_g0": ("FocalLoss", dict(gamma=0.0), "logit"),
    "focal_full_g05": ("FocalLoss", dict(weight=DRW_W, gamma=0.5, detach=False), "logit"),
    "cb_softmax": ("ClassBalancedLoss", dict(cls_num_list=COUNTS, beta=0.9999), "logit"),
    "cb_focal": ("ClassBalancedLoss", dict(cls_num_list=COUNTS, beta=0.9999, loss_type="focal", gamma=1.0),
                 "logit"),
    "cb_focal_g2_beta999": ("ClassBalancedLoss", dict(cls_num_list=SHUFFLED, beta=0.999, loss_type="focal",
                                                      gamma=2.0), "logit"),
    "gcl_cifar_stage1": ("GCLLoss", dict(cls_num_list=COUNTS, m=0.0, s=30, noise_mul=0.5), "gcl"),
    "gcl_cifar_stage2": ("GCLLoss", dict(cls_num_list=COUNTS, m=0.1, s=20, noise_mul=0.5, train_cls=True,
                                         gamma=1.0), "gcl"),
    "gcl_places_stage1": ("GCLLoss", dict(cls_num_list=COUNTS, m=0.0, s=30, noise_mul=1.0), "gcl"),
    "gcl_places_stage2": ("GCLLoss", dict(cls_num_list=COUNTS, m=0.1, s=15, noise_mul=1.0, train_cls=True,
                                          gamma=1.0), "gcl"),
    "gcl_default_weight": ("GCLLoss", dict(cls_num_list=SHUFFLED, weight=CB_W), "gcl"),
    "gclang": ("GCLAngLoss", dict(cls_num_list=COUNTS), "gcl"),
    "gclang_easy": ("GCLAngLoss", dict(cls_num_list=COUNTS, m=0.3, epsilon=0.2, easy_margin=True), "gcl"),
    "gclang_stage2": ("GCLAngLoss", dict(cls_num_list=SHUFFLED, m=0.1, s=20, train_cls=True, gamma=1.0,
                                         weight=CB_W), "gcl"),
    "gclang_big_eps": ("GCLAngLoss", dict(cls_num_list=COUNTS, m=0.5, epsilon=1.0, s=16), "gcl"),
    "arcface": ("ArcFaceLoss", dict(s=64.0, m=0.5), "cos"),
    "arcface_easy": ("ArcFaceLoss", dict(s=64.0, m=0.5, easy_margin=True), "cos"),
    "arcface_per_class": ("ArcFaceLoss", dict(s=30.0, m=_per_class(0.2, 0.7, 2)), "cos"),
    "fbl": ("FeaBalLoss", dict(cls_num_list=COUNTS, lambda_=60.0), "fbl"),
    "fbl_weight_150": ("FeaBalLoss", dict(cls_num_list=SHUFFLED, weight=CB_W, lambda_=150.0), "fbl"),
}


def build(name, device="cpu"):
    cls_name, kw, kind = CASES[name]
    return getattr(L, cls_name)(**kw).to(device), getattr(R, cls_name)(**kw), kind


def make_batch(kind, N=32, seed=0, dtype=torch.float64):
    """Inputs of one call, as a dict of tensors; differentiable ones are listed in ``grad_keys``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, C, (N,), generator=g)
    t[:C] = torch.arange(C)
    if kind == "logit":
        x = (torch.rand(N, C, generator=g, dtype=torch.float64) * 2 - 1) * 3
    else:
        x = torch.rand(N, C, generator=g, dtype=torch.float64) * 1.9 - 0.95
    b = {"x": x.to(dtype), "t": t}
    if kind == "gcl":
        b["noise"] = (torch.randn(N, C, generator=g, dtype=torch.float64) / 3).to(dtype)
        b["noise"][0, :4] = torch.tensor([1.7, -1.4, 0.0, -0.2])  # beyond the clamp, zero
    if kind == "fbl":
        f = torch.randn(N, 16, generator=g, dtype=torch.float64) * 2
        b["f"] = f.to(dtype)
        b["curr"] = 0.35
    return b


def call(mod, kind, b, xs, fs=None, form="explicit"):
    if kind == "gcl":
        return mod(xs, b["t"].to(xs.device), noise=b["noise"].to(xs.device))
    if kind == "fbl":
        if form == "official":
            return mod({"feature": fs, "score": xs}, b["t"].to(xs.device), b["curr"])
        return mod(xs, fs, b["t"].to(xs.device), curr=b["curr"])
    return mod(xs, b["t"].to(xs.device))


def loss_and_grads(mod, kind, b, device="cpu", dtype=None, go=None, form="explicit"):
    x = b["x"] if dtype is None else b["x"].to(dtype)
    x = x.to(device).requires_grad_(True)
    ins = [x]
    f = None
    if kind == "fbl":
        f = (b["f"] if dtype is None else b["f"].to(dtype)).to(device).requires_grad_(True)
        ins.append(f)
    loss = call(mod, kind, b, x, f, form)
    if go is None:
        go = (torch.linspace(0.3, 1.9, loss.numel(), dtype=torch.float64).reshape(loss.shape)
              if loss.dim() else torch.tensor(1.3, dtype=torch.float64))
    grads = torch.autograd.grad(loss, ins, go.to(device, loss.dtype))
    return loss.detach().cpu(), [gg.cpu() for gg in grads], go


# ----------------------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_float64_matches_reference(ltk_device, name):
    fused, refm, kind = build(name, ltk_device)
    b = make_batch(kind, seed=list(CASES).index(name))
    if name == "ce_weight_smooth_ignore":
        b["t"][[5, 11]] = 2
    l_ref, g_ref, go = loss_and_grads(refm, kind, b)
    l, g, _ = loss_and_grads(fused, kind, b, ltk_device, go=go)
    assert l.dtype == torch.float64 and l.shape == l_ref.shape
    torch.testing.assert_close(l, l_ref, **F64)
    for a, e in zip(g, g_ref):
        torch.testing.assert_close(a, e, **F64)
    assert all(torch.isfinite(a).all() for a in g)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_vs_float64_reference(ltk_device, name):
    fused, refm, kind = build(name, ltk_device)
    b = make_batch(kind, seed=100 + list(CASES).index(name))
    b32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in b.items()}
    b64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in b32.items()}
    l_ref, g_ref, go = loss_and_grads(refm, kind, b64)
    l, g, _ = loss_and_grads(fused, kind, b32, ltk_device, go=go)
    assert l.dtype == torch.float32
    s = float(CASES[name][1].get("s", 50.0 if "kps" in name else 3.0))
    # relative 1e-5, with an absolute floor of a few fp32 ulps of the logit scale for values that cancel
    torch.testing.assert_close(l.double(), l_ref, rtol=1e-5, atol=1e-7 * s)
    for a, e in zip(g, g_ref):
        scale = e.abs().max().item()
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5 * 1e-2 * scale + 1e-7 * s / 32)


@pytest.mark.parametrize("name", ["ldam_drw", "kps_cifar_ga", "gcl_cifar_stage2", "gclang", "arcface", "fbl",
                                  "cb_focal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_within_precision(ltk_device, name, dtype):
    fused, refm, kind = build(name, ltk_device)
    b = make_batch(kind, seed=7)
    bh = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in b.items()}
    b64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in bh.items()}
    l_ref, g_ref, go = loss_and_grads(refm, kind, b64)
    l, g, _ = loss_and_grads(fused, kind, bh, ltk_device, go=go)
    assert l.dtype == dtype
    eps = torch.finfo(dtype).eps
    # fp32 accumulation inside; the output and the gradient are rounded to the half type
    torch.testing.assert_close(l.double(), l_ref, rtol=4 * eps, atol=1e-5)
    if kind == "fbl":
        return  # the feature-norm path runs in torch ops in the half type (norm rounding), checked in fp32/fp64
    for a, e in zip(g, g_ref):
        torch.testing.assert_close(a.double(), e, rtol=4 * eps, atol=4 * eps * e.abs().max().item())


# ----------------------------------------------------------------------------------------------------------
# method-specific
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["explicit", "official"])
@pytest.mark.parametrize("curr", [0.0, 0.35, 1.2, "tensor"])
def test_feabal_both_call_forms_with_feature_grads(ltk_device, form, curr):
    fused, refm, kind = build("fbl_weight_150", ltk_device)
    b = make_batch("fbl", seed=3)
    b["curr"] = torch.tensor(0.6, dtype=torch.float64) if curr == "tensor" else curr
    if curr == "tensor":
        b["curr"] = b["curr"].to(ltk_device)
    l_ref, g_ref, go = loss_and_grads(refm, kind, {**b, "curr": b["curr"].cpu() if curr == "tensor" else curr},
                                      form=form)
    l, g, _ = loss_and_grads(fused, kind, b, ltk_device, go=go, form=form)
    torch.testing.assert_close(l, l_ref, **F64)
    torch.testing.assert_close(g[0], g_ref[0], **F64)
    torch.testing.assert_close(g[1], g_ref[1], **F64)
    if curr != 0.0:
        assert g[1].abs().max() > 0  # the stimulus really sends gradient into the features


def test_feabal_official_keyword_curr_and_zero_feature_row(ltk_device):
    fused, refm, _ = build("fbl", ltk_device)
    b = make_batch("fbl", N=12, seed=4)
    b["f"][[0, 5]] = 0.0  # zero feature rows: stimulus curr A lambda / 1e-12, subgradient 0 at f = 0
    b["t"][0] = 0  # head class (lambda = 0) keeps the loss moderate; row 5 keeps its tail target
    outs = []
    for mod, dev in ((refm, "cpu"), (fused, ltk_device)):
        x = b["x"].to(dev).requires_grad_(True)
        f = b["f"].to(dev).requires_grad_(True)
        loss = mod({"feature": f, "score": x}, b["t"].to(dev), curr=0.5)
        gx, gf = torch.autograd.grad(loss, (x, f))
        outs.append((loss.detach().cpu(), gx.cpu(), gf.cpu()))
    (lr, gxr, gfr), (lf, gxf, gff) = outs
    assert torch.isfinite(lf) and torch.isfinite(gxf).all() and torch.isfinite(gff).all()
    torch.testing.assert_close(lf, lr, rtol=1e-10, atol=0)
    torch.testing.assert_close(gxf, gxr, **F64)
    torch.testing.assert_close(gff, gfr, **F64)
    assert torch.all(gff[[0, 5]] == 0)


@pytest.mark.parametrize("name", ["arcface", "arcface_easy", "arcface_per_class", "gclang", "gclang_easy"])
def test_angular_at_unit_cosine_finite_and_equal_reference(ltk_device, name):
    fused, refm, kind = build(name, ltk_device)
    b = make_batch(kind, N=12, seed=5)
    x = b["x"]
    t = b["t"]
    # exact poles at targets and non-targets; ArcFace also beyond (clamped: zero gradient there)
    x[0, t[0]] = 1.0
    x[1, t[1]] = -1.0
    x[2, (t[2] + 1) % C] = 1.0
    x[3, (t[3] + 1) % C] = -1.0
    if kind == "cos":
        x[4, t[4]] = 1.25
        x[5, t[5]] = -1.5
        x[6, (t[6] + 2) % C] = 1.1
    l_ref, g_ref, go = loss_and_grads(refm, kind, b)
    l, g, _ = loss_and_grads(fused, kind, b, ltk_device, go=go)
    assert torch.isfinite(l).all() and torch.isfinite(g[0]).all()
    torch.testing.assert_close(l, l_ref, **F64)
    torch.testing.assert_close(g[0], g_ref[0], **F64)


EQUAL = [37] * 6


@pytest.mark.parametrize("cls_name,kw,kind", [
    ("LDAMLoss", dict(), "cos"), ("KPSLoss", dict(), "cos"), ("KPSLoss", dict(weighted=True), "cos"),
    ("LogitAdjustLoss", dict(), "logit"), ("BalancedSoftmaxLoss", dict(), "logit"),
    ("ClassBalancedLoss", dict(loss_type="focal", gamma=1.0), "logit"), ("GCLLoss", dict(m=0.1), "gcl"),
    ("GCLLoss", dict(), "gcl_internal"), ("GCLAngLoss", dict(), "gcl"), ("GCLAngLoss", dict(), "gcl_internal"),
    ("FeaBalLoss", dict(), "fbl")])
def test_all_equal_counts_no_nan(ltk_device, cls_name, kw, kind):
    fused = getattr(L, cls_name)(EQUAL, **kw).to(ltk_device)
    refm = getattr(R, cls_name)(EQUAL, **kw)
    g = torch.Generator().manual_seed(9)
    N, Cq = 8, len(EQUAL)
    x = torch.rand(N, Cq, generator=g, dtype=torch.float64) * 1.8 - 0.9
    t = torch.randint(0, Cq, (N,), generator=g)
    if kind in ("gcl", "gcl_internal"):
        noise = torch.randn(N, Cq, generator=g, dtype=torch.float64) / 3
        lf = fused(x.to(ltk_device), t.to(ltk_device), noise=None if kind == "gcl_internal" else noise.to(ltk_device))
        lr = refm(x, t, noise=noise)  # delta_hat = 0: the noise has no effect, so any draw gives this value
    elif kind == "fbl":
        f = torch.randn(N, 5, generator=g, dtype=torch.float64)
        lf, lr = fused(x.to(ltk_device), f.to(ltk_device), t.to(ltk_device), curr=0.7), refm(x, f, t, curr=0.7)
    else:
        lf, lr = fused(x.to(ltk_device), t.to(ltk_device)), refm(x, t)
    assert torch.isfinite(lf).all()
    torch.testing.assert_close(lf.cpu(), lr, **F64)


@pytest.mark.parametrize("cls_name", ["LDAMLoss", "KPSLoss", "LogitAdjustLoss", "BalancedSoftmaxLoss",
                                      "ClassBalancedLoss", "GCLLoss", "GCLAngLoss", "FeaBalLoss"])
@pytest.mark.parametrize("counts", [[100, 0, 5], [0], [10, 3, -2]])
def test_class_count_zero_or_negative_raises(cls_name, counts):
    with pytest.raises(ValueError, match=r"class count must be positive, got -?\d+ for class \d"):
        getattr(L, cls_name)(counts)


def test_kps_weighted_toggle_between_epochs(ltk_device):
    fused, refm, kind = build("kps_cifar", ltk_device)
    b = make_batch(kind, seed=8)
    for weighted in (False, True, False):
        fused.weighted = refm.weighted = weighted
        l_ref, g_ref, go = loss_and_grads(refm, kind, b)
        l, g, _ = loss_and_grads(fused, kind, b, ltk_device, go=go)
        torch.testing.assert_close(l, l_ref, **F64)
        torch.testing.assert_close(g[0], g_ref[0], **F64)


# ----------------------------------------------------------------------------------------------------------
# compile, .to(), state_dict
# ----------------------------------------------------------------------------------------------------------

COMPILE_CASES = ["ce_weight_smooth_ignore", "ldam_drw", "kps_cifar_ga", "la", "bs", "cosface", "focal_ldam_drw",
                 "cb_focal", "gcl_cifar_stage2", "gclang", "arcface", "fbl"]


@pytest.mark.parametrize("name", COMPILE_CASES)
def test_compile_fullgraph_module(ltk_device, name):
    fused, refm, kind = build(name, ltk_device)
    cm = torch.compile(fused, fullgraph=True, backend="aot_eager")
    b = make_batch(kind, N=16, seed=11)
    l_e, g_e, go = loss_and_grads(fused, kind, b, ltk_device)
    l_c, g_c, _ = loss_and_grads(cm, kind, b, ltk_device, go=go)
    torch.testing.assert_close(l_c, l_e, rtol=1e-14, atol=1e-14)
    for a, e in zip(g_c, g_e):
        torch.testing.assert_close(a, e, rtol=1e-14, atol=1e-14)
    l_r, g_r, _ = loss_and_grads(refm, kind, b, go=go)
    torch.testing.assert_close(l_c, l_r, **F64)


@pytest.mark.parametrize("name", ["gcl_cifar_stage1", "gclang_stage2"])
def test_compile_fullgraph_internal_noise(ltk_device, name):
    """In-kernel noise under torch.compile: the seed is drawn from the global generator inside the graph, so
    torch.manual_seed reproduces the eager value and two calls differ."""
    fused, _, _ = build(name, ltk_device)
    cm = torch.compile(fused, fullgraph=True, backend="aot_eager")
    b = make_batch("gcl", N=16, seed=12)
    x, t = b["x"].to(ltk_device), b["t"].to(ltk_device)
    torch.manual_seed(123)
    le = fused(x, t)
    torch.manual_seed(123)
    lc1 = cm(x, t)
    lc2 = cm(x, t)
    torch.testing.assert_close(lc1, le, rtol=0, atol=0)
    assert not torch.equal(lc1, lc2)


@pytest.mark.parametrize("name", ["ldam_drw", "kps_cifar_ga", "la", "cb_softmax", "gcl_cifar_stage2", "gclang",
                                  "arcface_per_class", "fbl", "cosface_per_class"])
def test_module_to_dtype_and_device(ltk_device, name):
    fused, refm, kind = build(name, "cpu")
    b = make_batch(kind, N=16, seed=13)
    # .to(float32) rounds the per-class buffers: same on both twins, then float64 inputs compare to 1e-10
    f32, r32 = fused.to(torch.float32), refm.to(torch.float32)
    l_ref, g_ref, go = loss_and_grads(r32, kind, b)
    l, g, _ = loss_and_grads(f32, kind, b, go=go)
    torch.testing.assert_close(l, l_ref, **F64)
    for a, e in zip(g, g_ref):
        torch.testing.assert_close(a, e, **F64)
    # back to float64 on the test device, then a float32 input
    fd = f32.to(device=ltk_device, dtype=torch.float64)
    for buf in fd.buffers():
        assert buf.device.type == torch.device(ltk_device).type
    l2, g2, _ = loss_and_grads(fd, kind, b, ltk_device, go=go)
    assert torch.isfinite(l2).all()
    fresh, _, _ = build(name, "cpu")
    fresh = fresh.half().float()  # module cast round trip still works on float32 inputs
    l3, _, _ = loss_and_grads(fresh, kind, b, dtype=torch.float32, go=go)
    assert l3.dtype == torch.float32 and torch.isfinite(l3).all()


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_keys_match_reference(name):
    fused, refm, _ = build(name)
    assert list(fused.state_dict().keys()) == list(refm.state_dict().keys())
    assert sorted(n for n, _ in fused.named_buffers()) == sorted(n for n, _ in refm.named_buffers())
    fused.load_state_dict(refm.state_dict(), strict=True)
    refm.load_state_dict(fused.state_dict(), strict=True)
    # twins by name, not by inheritance: both build their buffers with the same ltkernels.priors functions
    assert type(fused).__name__ == type(refm).__name__ and not isinstance(fused, type(refm))


def _as_plain(v):
    return v.detach().cpu().double() if isinstance(v, torch.Tensor) else v


def _same(a, b) -> bool:
    a, b = _as_plain(a), _as_plain(b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            torch.equal(a, b)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name", list(CASES))
def test_constructor_gives_the_reference_vectors_and_kernel_arguments(name):
    """The fused module and its reference built from the same constructor arguments hold the same per-class
    buffers and hyper-parameters, and every argument the reference passes to its cross-entropy is the one the
    fused module passes to the kernel. The two are separate classes (sharing the priors functions, not code by
    inheritance), so a constructor-mapping slip on one side shows here even where both compute the same math."""
    fused, refm, kind = build(name)
    fb, rb = dict(fused.named_buffers()), dict(refm.named_buffers())
    assert sorted(fb) == sorted(rb)
    for k in rb:
        assert fb[k].dtype == rb[k].dtype == torch.float64, k
        torch.testing.assert_close(fb[k], rb[k], rtol=0, atol=0, msg=f"{name}: buffer {k}")
    skip = set(vars(torch.nn.Module()))
    fa = {k: v for k, v in vars(fused).items() if k not in skip and not k.startswith("_")}
    ra = {k: v for k, v in vars(refm).items() if k not in skip and not k.startswith("_")}
    assert set(ra) <= set(fa) and set(fa) - set(ra) <= {"generator"}, (sorted(fa), sorted(ra))
    for k in ra:
        assert _same(fa[k], ra[k]), f"{name}: attribute {k}: {fa[k]!r} vs {ra[k]!r}"
    # the kernel arguments, for a float64 input (no dtype conversion in between)
    b = make_batch(kind, N=12, seed=21)
    x, t = b["x"], b["t"]
    if kind == "fbl":
        fc, rc = (m.cross_entropy_call(x, b["f"], t, b["curr"]) for m in (fused, refm))
    elif kind == "gcl":
        fc, rc = (m.cross_entropy_call(x, t, noise=b["noise"]) for m in (fused, refm))
    else:
        fc, rc = (m.cross_entropy_call(x, t) for m in (fused, refm))
    assert fc.function is (LF.cross_entropy if CASES[name][0] == "CrossEntropyLoss" else LF.margin_cross_entropy)
    assert rc.function is R.margin_cross_entropy and fc.target is t
    for k, v in rc.kwargs.items():
        assert k in fc.kwargs and _same(fc.kwargs[k], v), f"{name}: {k}: {fc.kwargs.get(k)!r} vs {v!r}"
    assert fc.kwargs.get("reduction", "mean") == rc.kwargs.get("reduction", "mean")
    # what the fused kernel does itself: the cloud, GCLAng's epsilon, FBL's lambda
    if "cloud" in fc.kwargs:
        assert _same(fc.kwargs["cloud"], refm.m_list)
    if "angular_eps" in fc.kwargs:
        assert fc.kwargs["angular_eps"] == refm.epsilon
    if "shift_coef" in fc.kwargs:
        assert _same(fc.kwargs["shift_coef"], refm.lam_list)
    # and forward is that call
    torch.testing.assert_close(fc.run(), call(fused, kind, b, x, b.get("f")), rtol=0, atol=0)


def test_every_fused_module_is_covered():
    covered = {CASES[n][0] for n in CASES}
    assert set(L.__all__) <= covered, set(L.__all__) - covered
