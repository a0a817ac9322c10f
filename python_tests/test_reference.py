"""Tests for ltkernels.reference (the eager oracle) against F.cross_entropy and hand formulas.

Hand formulas here are written independently of the module under test: per-class vectors with
math/numpy, logits built elementwise in numpy, cross-entropy via numpy logsumexp or
torch.nn.functional.cross_entropy.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltkernels import reference as R

DT = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)
COUNTS = [500, 120, 37, 9, 2, 60]
C = len(COUNTS)


def _data(N=9, C=C, seed=0, lo=-1.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (lo + (hi - lo) * torch.rand(N, C, generator=g, dtype=DT))
    t = torch.randint(0, C, (N,), generator=g)
    t[: min(C, N)] = torch.arange(min(C, N))  # every class present
    t = t[torch.randperm(N, generator=g)]
    return x, t


def _weight(C=C, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 2.0 * torch.rand(C, generator=g, dtype=DT)


def _np_ce_rows(z, t):
    """Per-row softmax CE with numpy (max-shifted)."""
    z = np.asarray(z, dtype=np.float64)
    mx = z.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(z - mx).sum(axis=1))
    return lse - z[np.arange(len(t)), np.asarray(t)]


def _np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _onehot(t, C=C):
    Y = np.zeros((len(t), C))
    Y[np.arange(len(t)), np.asarray(t)] = 1.0
    return Y


def _cloud(counts):
    lm = np.log(np.asarray(counts, dtype=np.float64))
    d = lm.max() - lm
    return d / d.max() if d.max() > 0 else np.zeros_like(d)


# ====================================================================== margin_cross_entropy
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("use_w", [False, True])
@pytest.mark.parametrize("ignore", ["no", "rows", "in_range"])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_mce_matches_torch_cross_entropy(reduction, use_w, ignore, ls):
    x, t = _data(N=11)
    w = _weight() if use_w else None
    kw = {}
    if ignore == "rows":
        t = t.clone()
        t[[1, 4]] = -100
    elif ignore == "in_range":
        kw["ignore_index"] = 2
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    a = R.margin_cross_entropy(x1, t, weight=w, reduction=reduction, label_smoothing=ls, **kw)
    b = F.cross_entropy(x2, t, weight=w, reduction=reduction, label_smoothing=ls, **kw)
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, **TOL)
    g = torch.randn(a.shape, dtype=DT, generator=torch.Generator().manual_seed(5))
    (ga,) = torch.autograd.grad(a, x1, g)
    (gb,) = torch.autograd.grad(b, x2, g)
    torch.testing.assert_close(ga, gb, **TOL)


@pytest.mark.parametrize("use_w", [False, True])
@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_mce_batch_mean(use_w, ls):
    x, t = _data(N=10)
    t = t.clone()
    t[3] = -100
    w = _weight() if use_w else None
    a = R.margin_cross_entropy(x, t, weight=w, reduction="batch_mean", label_smoothing=ls)
    b = F.cross_entropy(x, t, weight=w, reduction="none", label_smoothing=ls).sum() / 10
    torch.testing.assert_close(a, b, **TOL)
    if use_w:  # differs from PyTorch's weighted mean
        assert abs(a.item() - F.cross_entropy(x, t, weight=w, label_smoothing=ls).item()) > 1e-3


def test_mce_transforms_hand():
    x, t = _data(N=8)
    g = torch.Generator().manual_seed(3)
    r = 0.5 + torch.rand(C, generator=g, dtype=DT)
    b = torch.randn(C, generator=g, dtype=DT)
    m = 0.5 * torch.rand(C, generator=g, dtype=DT)
    ts = 5 + 10 * torch.rand(C, generator=g, dtype=DT)
    w = _weight()
    xn, tn = x.numpy(), t.numpy()
    for use_ts in (False, True):
        z = np.empty_like(xn)
        for i in range(xn.shape[0]):
            S = ts[tn[i]].item() if use_ts else 7.5
            for j in range(C):
                z[i, j] = S * (r[j].item() * xn[i, j] + b[j].item() - (m[tn[i]].item() if j == tn[i] else 0.0))
        kw = dict(target_scale=ts) if use_ts else dict(scale=7.5)
        got = R.margin_cross_entropy(x, t, col_scale=r, col_bias=b, margin=m, weight=w, **kw)
        exp = F.cross_entropy(torch.from_numpy(z), t, weight=w)
        torch.testing.assert_close(got, exp, **TOL)
        got_none = R.margin_cross_entropy(x, t, col_scale=r, col_bias=b, margin=m, reduction="none", **kw)
        np.testing.assert_allclose(got_none.numpy(), _np_ce_rows(z, tn), rtol=1e-12, atol=1e-12)


def test_mce_scalar_vectors_broadcast():
    x, t = _data()
    a = R.margin_cross_entropy(x, t, scale=3.0, margin=0.25, col_bias=0.1)
    b = R.margin_cross_entropy(x, t, scale=3.0, margin=torch.full((C,), 0.25, dtype=DT))
    torch.testing.assert_close(a, b, **TOL)


def test_mce_float32_dtype_and_device_vectors():
    x, t = _data()
    x32 = x.float()
    out = R.margin_cross_entropy(x32, t, margin=torch.full((C,), 0.2, dtype=DT), weight=_weight(),
                                 scale=2.0)
    assert out.dtype == torch.float32
    ref = R.margin_cross_entropy(x, t, margin=0.2, weight=_weight(), scale=2.0)
    assert abs(out.item() - ref.item()) < 1e-5


def _focal_hand(x, t, w, gamma, ignore_rows=()):
    z = x.numpy()
    tn = t.numpy().copy()
    valid = np.ones(len(tn), bool)
    valid[list(ignore_rows)] = False
    tn[~valid] = 0
    wn = np.ones(C) if w is None else w.numpy()
    lt = wn[tn] * _np_ce_rows(z, tn)
    lt[~valid] = 0.0
    p = np.exp(-lt)
    rows = (1 - p) ** gamma * lt
    # d rows / d lt, detached and not
    coef_det = (1 - p) ** gamma
    coef_full = coef_det + (gamma * (1 - p) ** (gamma - 1) * p * lt if gamma > 0 else 0.0)
    dl_dz = wn[tn][:, None] * (_np_softmax(z) - _onehot(tn))
    dl_dz[~valid] = 0.0
    return rows, coef_det[:, None] * dl_dz, coef_full[:, None] * dl_dz


@pytest.mark.parametrize("use_w", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_focal_value_and_gradients_hand(use_w, gamma):
    x, t = _data(N=10, lo=-2, hi=2)
    t = t.clone()
    t[7] = -100
    w = _weight() if use_w else None
    rows, g_det, g_full = _focal_hand(x, t, w, gamma, ignore_rows=[7])
    N = x.shape[0]
    for red, val in (("none", rows), ("sum", rows.sum()), ("mean", rows.sum() / N),
                     ("batch_mean", rows.sum() / N)):
        got = R.margin_cross_entropy(x, t, weight=w, reduction=red, focal_gamma=gamma)
        np.testing.assert_allclose(got.numpy(), val, rtol=1e-12, atol=1e-12)
    for detach, g_exp in ((True, g_det), (False, g_full)):
        xx = x.clone().requires_grad_()
        R.margin_cross_entropy(xx, t, weight=w, focal_gamma=gamma, focal_detach=detach).backward()
        np.testing.assert_allclose(xx.grad.numpy(), g_exp / N, rtol=1e-10, atol=1e-12)
    if gamma > 0:
        assert np.abs(g_det - g_full).max() > 1e-4  # the two modes are really different


def test_focal_gamma0_is_weighted_sum_over_N():
    x, t = _data()
    w = _weight()
    a = R.margin_cross_entropy(x, t, weight=w, focal_gamma=0.0)
    b = F.cross_entropy(x, t, weight=w, reduction="sum") / x.shape[0]
    torch.testing.assert_close(a, b, **TOL)


def test_mce_errors():
    x, t = _data()
    with pytest.raises(ValueError, match="cannot be combined"):
        R.margin_cross_entropy(x, t, focal_gamma=1.0, label_smoothing=0.1)
    with pytest.raises(ValueError, match="reduction must be one of"):
        R.margin_cross_entropy(x, t, reduction="avg")
    bad = t.clone()
    bad[0] = C
    with pytest.raises(ValueError, match="out of range"):
        R.margin_cross_entropy(x, bad)
    bad[0] = -1
    with pytest.raises(ValueError, match="out of range"):
        R.margin_cross_entropy(x, bad)
    with pytest.raises(ValueError, match=r"margin must have shape \(6,\)"):
        R.margin_cross_entropy(x, t, margin=torch.zeros(C + 1))
    with pytest.raises(ValueError, match="integer class indices"):
        R.margin_cross_entropy(x, t.double())
    with pytest.raises(ValueError, match="2-D"):
        R.margin_cross_entropy(x[0], t[:1])
    with pytest.raises(ValueError, match="focal_gamma must be >= 0"):
        R.margin_cross_entropy(x, t, focal_gamma=-1.0)


def test_mce_gradcheck():
    x, t = _data(N=5, C=4)
    g = torch.Generator().manual_seed(9)
    r = (0.5 + torch.rand(4, generator=g, dtype=DT)).requires_grad_()
    m = 0.3 * torch.rand(4, generator=g, dtype=DT)
    ts = 2 + torch.rand(4, generator=g, dtype=DT)
    w = _weight(4)
    t = t.clone()
    t[2] = -100
    xx = x.clone().requires_grad_()
    for kw in (dict(reduction="mean", label_smoothing=0.1), dict(reduction="batch_mean"),
               dict(reduction="none"), dict(focal_gamma=2.0, focal_detach=False),
               dict(focal_gamma=1.5, focal_detach=False, reduction="sum")):
        fn = lambda a, rr: R.margin_cross_entropy(a, t, col_scale=rr, margin=m, target_scale=ts,
                                                   col_bias=0.05, weight=w, **kw)
        assert torch.autograd.gradcheck(fn, (xx, r))


# ====================================================================== modules: CE family
def test_cross_entropy_module():
    x, t = _data()
    t = t.clone()
    t[0] = 1
    w = _weight()
    for kw in (dict(), dict(weight=w, label_smoothing=0.05), dict(ignore_index=1, reduction="sum"),
               dict(weight=w, reduction="none")):
        torch.testing.assert_close(R.CrossEntropyLoss(**kw)(x, t),
                                   torch.nn.CrossEntropyLoss(**kw)(x, t), **TOL)


@pytest.mark.parametrize("use_w", [False, True])
def test_ldam_hand(use_w):
    x, t = _data()
    w = _weight() if use_w else None
    m = np.array([c ** -0.25 for c in COUNTS])
    m = m * 0.5 / m.max()
    z = 30 * (x.numpy() - m[t.numpy()][:, None] * _onehot(t))
    torch.testing.assert_close(R.LDAMLoss(COUNTS, weight=w)(x, t),
                               F.cross_entropy(torch.from_numpy(z), t, weight=w), **TOL)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_kps_hand(flip, weighted):
    x, t = _data()
    w = _weight()
    nmin = min(COUNTS)
    r = np.array([math.log(50 * c / nmin) / math.log(50) for c in COUNTS])
    mp = r[::-1].copy() if flip else r.max() + 1 - r
    m = mp * 0.2 / mp.max()
    s = 15.0
    S = np.clip(s * mp, s, 50)[t.numpy()] if weighted else np.full(len(t), s)
    z = S[:, None] * (x.numpy() * r[None, :] - m[t.numpy()][:, None] * _onehot(t))
    loss = R.KPSLoss(COUNTS, max_m=0.2, weighted=weighted, weight=w, s=s, flip_compat=flip)
    torch.testing.assert_close(loss(x, t), F.cross_entropy(torch.from_numpy(z), t, weight=w), **TOL)


def test_kps_weighted_toggle_and_gradient():
    x, t = _data()
    loss = R.KPSLoss(COUNTS, max_m=0.2, s=15)
    a = loss(x, t)
    loss.weighted = True
    b = loss(x, t)
    assert abs(a.item() - b.item()) > 1e-6
    xx = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda c: loss(c, t), (xx,))


def test_logit_adjust_and_balanced_softmax_hand():
    x, t = _data(lo=-3, hi=3)
    w = _weight()
    n = np.asarray(COUNTS, dtype=np.float64)
    la = 1.5 * np.log(n / n.sum() + 1e-12)
    torch.testing.assert_close(R.LogitAdjustLoss(COUNTS, tau=1.5, weight=w)(x, t),
                               F.cross_entropy(x + torch.from_numpy(la), t, weight=w), **TOL)
    torch.testing.assert_close(R.BalancedSoftmaxLoss(COUNTS)(x, t),
                               F.cross_entropy(x + torch.from_numpy(np.log(n)), t), **TOL)


def test_cosface_hand():
    x, t = _data()
    z = 64 * (x.numpy() - 0.4 * _onehot(t))
    torch.testing.assert_close(R.CosFaceLoss()(x, t), F.cross_entropy(torch.from_numpy(z), t), **TOL)
    mv = torch.linspace(0.1, 0.6, C, dtype=DT)
    z = 30 * (x.numpy() - mv.numpy()[t.numpy()][:, None] * _onehot(t))
    torch.testing.assert_close(R.CosFaceLoss(s=30, m=mv)(x, t),
                               F.cross_entropy(torch.from_numpy(z), t), **TOL)


@pytest.mark.parametrize("detach", [True, False])
def test_focal_module(detach):
    x, t = _data(lo=-2, hi=2)
    w = _weight()
    rows, g_det, g_full = _focal_hand(x, t, w, 1.0)
    xx = x.clone().requires_grad_()
    out = R.FocalLoss(weight=w, gamma=1.0, detach=detach)(xx, t)
    np.testing.assert_allclose(out.item(), rows.mean(), rtol=1e-12)
    out.backward()
    np.testing.assert_allclose(xx.grad.numpy(), (g_det if detach else g_full) / len(t), rtol=1e-10,
                               atol=1e-12)
    with pytest.raises(ValueError):
        R.FocalLoss(gamma=-1)


def test_class_balanced_loss_hand():
    x, t = _data(lo=-2, hi=2)
    beta = 0.999
    w = np.array([(1 - beta) / (1 - beta ** c) for c in COUNTS])
    w = w / w.sum() * C
    rows = w[t.numpy()] * _np_ce_rows(x.numpy(), t.numpy())
    np.testing.assert_allclose(R.ClassBalancedLoss(COUNTS, beta=beta)(x, t).item(),
                               rows.sum() / len(t), rtol=1e-12)
    foc = (1 - np.exp(-rows)) ** 2.0 * rows
    np.testing.assert_allclose(
        R.ClassBalancedLoss(COUNTS, beta=beta, loss_type="focal", gamma=2.0)(x, t).item(),
        foc.sum() / len(t), rtol=1e-12)
    with pytest.raises(ValueError, match="loss_type"):
        R.ClassBalancedLoss(COUNTS, loss_type="sigmoid")


# ====================================================================== GCL
def _gcl_hand_logits(x, t, noise, counts, m, s, noise_mul):
    d = _cloud(counts)
    e = np.abs(np.clip(noise.numpy(), -1, 1))
    c = x.numpy() - noise_mul * e * d[None, :]
    return s * (c - m * _onehot(t, len(counts)))


@pytest.mark.parametrize("use_w", [False, True])
def test_gcl_injected_noise_hand(use_w):
    x, t = _data()
    w = _weight() if use_w else None
    noise = torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(4)) / 2
    noise[0, :3] = torch.tensor([1.7, -2.5, -0.2], dtype=DT)  # exercise clamp and abs
    z = _gcl_hand_logits(x, t, noise, COUNTS, m=0.1, s=30, noise_mul=0.5)
    got = R.GCLLoss(COUNTS, m=0.1, weight=w, s=30, noise_mul=0.5)(x, t, noise)
    torch.testing.assert_close(got, F.cross_entropy(torch.from_numpy(z), t, weight=w), **TOL)
    # stage 2: detached focal, mean over N
    z = _gcl_hand_logits(x, t, noise, COUNTS, m=0.1, s=20, noise_mul=0.5)
    lt = (np.ones(C) if w is None else w.numpy())[t.numpy()] * _np_ce_rows(z, t.numpy())
    got = R.GCLLoss(COUNTS, m=0.1, weight=w, s=20, train_cls=True, noise_mul=0.5, gamma=1.0)(x, t, noise)
    np.testing.assert_allclose(got.item(), ((1 - np.exp(-lt)) * lt).mean(), rtol=1e-12)


def test_gcl_gradient_is_s_times_G():
    x, t = _data()
    noise = torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(2)) / 3
    xx = x.clone().requires_grad_()
    R.GCLLoss(COUNTS, m=0.0, s=30, noise_mul=1.0)(xx, t, noise).backward()
    z = _gcl_hand_logits(x, t, noise, COUNTS, 0.0, 30, 1.0)
    G = (_np_softmax(z) - _onehot(t)) / len(t)
    np.testing.assert_allclose(xx.grad.numpy(), 30 * G, rtol=1e-10, atol=1e-13)


def test_gcl_default_noise_mirrors_official_draw():
    x, t = _data()
    loss = R.GCLLoss(COUNTS, m=0.0, s=30, noise_mul=0.5)
    torch.manual_seed(123)
    got = loss(x, t)
    torch.manual_seed(123)
    raw = torch.distributions.normal.Normal(0, 1 / 3).sample(x.shape)  # the official draw
    torch.testing.assert_close(got, loss(x, t, raw.to(DT)), **TOL)
    # fresh noise on every call
    assert loss(x, t).item() != loss(x, t).item()


def test_gcl_all_equal_counts_no_nan():
    x, t = _data()
    noise = torch.randn(x.shape, dtype=DT)
    got = R.GCLLoss([10] * C, m=0.2, s=30)(x, t, noise)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, R.CosFaceLoss(s=30, m=0.2)(x, t), **TOL)
    got = R.GCLAngLoss([10] * C, m=0.2, s=30)(x, t, noise)
    assert torch.isfinite(got)


def _gclang_hand_out(x, t, noise, counts, m, eps_, easy):
    d = _cloud(counts)
    c = x.numpy()
    e = np.clip(noise.numpy(), -1, 1)
    out = np.empty_like(c)
    for i in range(c.shape[0]):
        for j in range(c.shape[1]):
            eta = math.pi / 2 * eps_ * d[j] * e[i, j]
            M = abs(eta) + (m if j == t[i].item() else 0.0)
            cij = c[i, j]
            sine = math.sqrt(min(max(1 - cij * cij, 0.0), 1.0))
            phi = cij * math.cos(M) - sine * math.sin(M)
            if easy:
                out[i, j] = phi if cij > 0 else cij
            else:
                out[i, j] = phi if cij > math.cos(math.pi - M) else cij - math.sin(math.pi - M)
    return out


@pytest.mark.parametrize("easy", [False, True])
@pytest.mark.parametrize("train_cls", [False, True])
def test_gclang_hand(easy, train_cls):
    x, t = _data(N=12, lo=-1.0, hi=1.0)
    x[0, :] = torch.tensor([-0.999, -0.95, 0.999, 1.0, -1.0, 0.0], dtype=DT)  # both branches
    w = _weight()
    noise = torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(7)) / 2
    noise[1, :2] = torch.tensor([3.0, -3.0], dtype=DT)
    out = _gclang_hand_out(x, t, noise, COUNTS, m=0.5, eps_=0.3, easy=easy)
    loss = R.GCLAngLoss(COUNTS, m=0.5, epsilon=0.3, weight=w, s=30, easy_margin=easy,
                        train_cls=train_cls, gamma=1.0)
    got = loss(x, t, noise)
    z = 30 * out
    if train_cls:
        lt = w.numpy()[t.numpy()] * _np_ce_rows(z, t.numpy())
        np.testing.assert_allclose(got.item(), ((1 - np.exp(-lt)) * lt).mean(), rtol=1e-12)
    else:
        torch.testing.assert_close(got, F.cross_entropy(torch.from_numpy(z), t, weight=w), **TOL)


def test_gclang_gradients():
    x, t = _data(N=6, lo=-0.9, hi=0.9)
    noise = torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(8)) / 3
    loss = R.GCLAngLoss(COUNTS, m=0.5, epsilon=0.5, s=10)
    xx = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda c: loss(c, t, noise), (xx,))
    # finite gradient at |c| = 1 (target and non-target columns)
    x2 = x.clone()
    x2[0, :] = 1.0
    x2[1, :] = -1.0
    x2 = x2.requires_grad_()
    loss(x2, t, noise).backward()
    assert torch.isfinite(x2.grad).all()


# ====================================================================== ArcFace
def _arc_hand(x, t, mvec, easy):
    c = np.clip(x.numpy(), -1, 1)
    out = c.copy()
    for i in range(c.shape[0]):
        y = t[i].item()
        m = mvec[y]
        cy = c[i, y]
        sine = math.sqrt(min(max(1 - cy * cy, 0.0), 1.0))
        phi = cy * math.cos(m) - sine * math.sin(m)
        if easy:
            out[i, y] = phi if cy > 0 else cy
        else:
            out[i, y] = phi if cy > math.cos(math.pi - m) else cy - math.sin(math.pi - m) * m
    return out


@pytest.mark.parametrize("easy", [False, True])
@pytest.mark.parametrize("per_class", [False, True])
def test_arcface_hand(easy, per_class):
    x, t = _data(N=12)
    rows = torch.arange(4)
    x[rows, t[rows]] = torch.tensor([-0.99, -0.5, 1.0 + 1e-9, -1.0 - 1e-9], dtype=DT)  # branches, clamp
    mvec = np.linspace(0.2, 0.7, C) if per_class else np.full(C, 0.5)
    m = torch.from_numpy(mvec) if per_class else 0.5
    out = _arc_hand(x, t, mvec, easy)
    got = R.ArcFaceLoss(s=64.0, m=m, easy_margin=easy)(x, t)
    torch.testing.assert_close(got, F.cross_entropy(torch.from_numpy(64 * out), t), **TOL)


def test_arcface_gradients():
    x, t = _data(N=6, lo=-0.8, hi=0.8)
    loss = R.ArcFaceLoss(s=8.0, m=0.5)
    xx = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda c: loss(c, t), (xx,))
    x2 = x.clone()
    x2[0, :] = 1.0
    x2[1, :] = -1.0
    x2 = x2.requires_grad_()
    loss(x2, t).backward()
    assert torch.isfinite(x2.grad).all()


# ====================================================================== FBL
def test_feabal_hand_and_call_forms():
    x, t = _data(lo=-3, hi=3)
    f = torch.randn(x.shape[0], 4, dtype=DT, generator=torch.Generator().manual_seed(6))
    w = _weight()
    lam = _cloud(COUNTS)
    curr = 0.7
    norm = np.linalg.norm(f.numpy(), axis=1)
    z = x.numpy() - curr * 60.0 * lam[None, :] / (norm[:, None] + 1e-12)
    exp = F.cross_entropy(torch.from_numpy(z), t, weight=w)
    loss = R.FeaBalLoss(COUNTS, weight=w, lambda_=60.0)
    torch.testing.assert_close(loss(x, f, t, curr), exp, **TOL)
    torch.testing.assert_close(loss(x, f, t, curr=curr), exp, **TOL)
    torch.testing.assert_close(loss({"feature": f, "score": x}, t, curr), exp, **TOL)
    torch.testing.assert_close(loss({"feature": f, "score": x}, t, curr=curr), exp, **TOL)
    torch.testing.assert_close(loss(x, f, t), F.cross_entropy(x, t, weight=w), **TOL)  # curr=0


def test_feabal_feature_gradient_matches_methods_formula():
    x, t = _data(lo=-2, hi=2)
    f = torch.randn(x.shape[0], 5, dtype=DT, generator=torch.Generator().manual_seed(11))
    alpha, A = 0.8, 60.0
    lam = _cloud(COUNTS)
    ff = f.clone().requires_grad_()
    R.FeaBalLoss(COUNTS, lambda_=A)(x, ff, t, alpha).backward()
    fn = f.numpy()
    norm = np.linalg.norm(fn, axis=1)
    z = x.numpy() - alpha * A * lam[None, :] / (norm[:, None] + 1e-12)
    G = (_np_softmax(z) - _onehot(t)) / len(t)
    coef = alpha * A * (G * lam[None, :]).sum(1) / (norm + 1e-12) ** 2
    np.testing.assert_allclose(ff.grad.numpy(), coef[:, None] * fn / norm[:, None], rtol=1e-10,
                               atol=1e-13)
    # the norm is not detached: the gradient is non-zero even though logits do not depend on f
    assert np.abs(ff.grad.numpy()).max() > 1e-3
    xx = x.clone().requires_grad_()
    f2 = f.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: R.FeaBalLoss(COUNTS)(a, b, t, 0.3), (xx, f2))


def test_feabal_zero_feature_and_equal_counts():
    x, t = _data()
    f = torch.randn(x.shape[0], 3, dtype=DT)
    f[0] = 0.0
    ff = f.clone().requires_grad_()
    out = R.FeaBalLoss(COUNTS)(x, ff, t, 0.5)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(ff.grad).all()
    assert (ff.grad[0] == 0).all()  # zero subgradient at f = 0
    torch.testing.assert_close(R.FeaBalLoss([3] * C)(x, f, t, 1.0), F.cross_entropy(x, t), **TOL)
