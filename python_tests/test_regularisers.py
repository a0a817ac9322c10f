"""Tests of ltkernels.regularisers (uniformity op, feature-norm term, composite loss, NC regularisers and
metrics). The methods are reconstructed from the abstracts; these tests check the implementation against
its own eager reference and the documented formulas, not against the papers."""
from __future__ import annotations

import math

import pytest
import torch

from ltkernels import regularisers as R

KERNELS = [("gaussian", {}), ("gaussian", {"t": 7.0}), ("gaussian", {"t": 200.0}), ("riesz", {"s": 1.0}), ("riesz", {"s": 2.0}),
           ("riesz", {"s": 0.5}), ("log", {})]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _w(C, D, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, D, generator=g, dtype=dtype).to(device)


def _naive(w, kernel, t=2.0, s=1.0):
    """Direct double loop over pairs (the formula as written), float64."""
    wh = torch.nn.functional.normalize(w.double(), dim=1)
    C = wh.shape[0]
    vals = []
    for j in range(C):
        for k in range(C):
            if j != k:
                d2 = max(float((wh[j] - wh[k]).square().sum()), 1e-12)
                vals.append(d2)
    d2 = torch.tensor(vals, dtype=torch.float64)
    if kernel == "gaussian":
        return float(torch.logsumexp(-t * d2, 0) - math.log(C * (C - 1)))
    if kernel == "riesz":
        return float(d2.pow(-s / 2).mean())
    return float((-0.5 * d2.log()).mean())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel,kw", KERNELS)
@pytest.mark.parametrize("C,D,block", [(2, 3, 0), (13, 5, 4), (37, 16, 8), (64, 7, 0)])
def test_parity_value_and_grad(device, kernel, kw, C, D, block):
    w = _w(C, D, device=device)
    w1 = w.clone().requires_grad_()
    w2 = w.clone().requires_grad_()
    v1 = R.uniformity(w1, kernel, block=block, **kw)
    v2 = R.uniformity_reference(w2, kernel, **kw)
    torch.testing.assert_close(v1, v2, rtol=1e-10, atol=1e-12)
    if C <= 13:
        assert abs(float(v1.detach()) - _naive(w, kernel, **kw)) < 1e-9 * max(1.0, abs(float(v1.detach())))
    go = torch.tensor(0.7, dtype=w.dtype, device=device)
    (g1,) = torch.autograd.grad(v1, w1, go)
    (g2,) = torch.autograd.grad(v2, w2, go)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("kernel,kw", KERNELS)
def test_float32_parity_and_layouts(kernel, kw):
    w = _w(50, 12, dtype=torch.float32)
    wt = w.t().contiguous().requires_grad_()  # (D, C) official layout
    w1 = w.clone().requires_grad_()
    v1 = R.uniformity(w1, kernel, block=16, **kw)
    v2 = R.uniformity(wt, kernel, layout="in_out", **kw)
    v3 = R.uniformity_reference(w.double(), kernel, **kw)
    torch.testing.assert_close(v1.double(), v3, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(v1, v2, rtol=2e-5, atol=1e-6)
    v1.backward()
    v2.backward()
    assert wt.grad.shape == wt.shape
    torch.testing.assert_close(w1.grad, wt.grad.t(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kernel,kw", KERNELS)
def test_gradcheck(kernel, kw):
    w = _w(9, 4, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: R.uniformity(x, kernel, block=4, **kw), (w,))


def test_gradcheck_weight_below_eps_and_scaled_rows():
    w = _w(7, 3, seed=4)
    w[2] *= 1e-3
    w = w.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: R.uniformity(x, "riesz", s=2.0, eps=1e-2, block=2), (w,))
    assert torch.autograd.gradcheck(lambda x: R.uniformity(x, "gaussian", eps=1e-2, block=3), (w,))


@pytest.mark.parametrize("kernel,kw", KERNELS[:1] + KERNELS[2:4] + KERNELS[5:])
def test_opcheck(kernel, kw):
    from ltkernels import _ops  # noqa: F401  (loads the extension with the op's fake kernel and autograd)
    from ltkernels.regularisers import UNIFORMITY_KERNELS
    param = kw.get("t", kw.get("s", 2.0 if kernel == "gaussian" else 1.0))
    w = _w(11, 5, dtype=torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.ltkernels.uniformity, (w, UNIFORMITY_KERNELS[kernel], param, 1e-12, 1e-12, 4, True))
    torch.library.opcheck(torch.ops.ltkernels.uniformity, (w.detach(), UNIFORMITY_KERNELS[kernel], param, 1e-12, 1e-12,
                                                           0, False))


def test_compile_fullgraph():
    w = _w(20, 6, dtype=torch.float32).requires_grad_()

    def f(x):
        return R.uniformity(x, "gaussian") + 0.5 * R.uniformity(x, "riesz", s=2.0)

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    v1 = cf(w)
    (g1,) = torch.autograd.grad(v1, w)
    v2 = f(w)
    (g2,) = torch.autograd.grad(v2, w)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(g1, g2)


def test_large_C_tiled_matches_eager():
    # C = 8142 (iNat), small D: eager holds a few C x C float64 matrices (~0.5 GB each), which fits here.
    C, D = 8142, 16
    w = _w(C, D, dtype=torch.float32, seed=5)
    ref_w = w.double()
    for kernel, kw in (("gaussian", {}), ("riesz", {"s": 1.0})):
        v = R.uniformity(w, kernel, **kw)
        with torch.no_grad():
            vr = R.uniformity_reference(ref_w, kernel, **kw)
        assert abs(float(v) - float(vr)) <= 1e-5 * abs(float(vr)) + 1e-6, (kernel, float(v), float(vr))


def test_coincident_vectors_finite():
    w = _w(6, 4, dtype=torch.float32)
    w[3] = w[1] * 2.0  # same direction: distance 0 after normalisation
    w[5] = 0.0  # zero vector
    for kernel, kw in KERNELS:
        x = w.clone().requires_grad_()
        v = R.uniformity(x, kernel, **kw)
        v.backward()
        assert torch.isfinite(v), kernel
        assert torch.isfinite(x.grad).all(), kernel
    # Riesz s=2 at a coincident pair: d2 clamped to 1e-12, so the pair contributes 1e12 / (C(C-1))
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    v = R.uniformity(x, "riesz", s=2.0)
    expected = (2 * 1e12 + 4 * 0.5) / 6
    assert abs(float(v) - expected) < 1e-6 * expected


def test_stable_lse_large_t():
    # exp(-t d2) underflows float32 for t = 200 unless the tiles are max-shifted.
    w = _w(40, 8, dtype=torch.float32).requires_grad_()
    v = R.uniformity(w, "gaussian", t=200.0, block=8)
    vr = R.uniformity_reference(w.detach().double(), "gaussian", t=200.0)
    assert torch.isfinite(v)
    assert abs(float(v.detach()) - float(vr)) < 1e-3 * abs(float(vr))
    v.backward()
    assert torch.isfinite(w.grad).all()


def test_half_input_and_no_grad_path():
    w = _w(10, 4, dtype=torch.float32)
    v = R.uniformity(w.half(), "gaussian")
    assert v.dtype == torch.float32
    with torch.no_grad():
        v2 = R.uniformity(w.requires_grad_(), "riesz")
    assert not v2.requires_grad


def test_bad_inputs():
    w = _w(5, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="kernel"):
        R.uniformity(w, "cauchy")
    with pytest.raises(ValueError, match="2-D"):
        R.uniformity(w[0], "gaussian")
    with pytest.raises(ValueError, match="at least 2 classes"):
        R.uniformity(w[:1], "gaussian")
    with pytest.raises(ValueError, match="t must be"):
        R.uniformity(w, "gaussian", t=-1.0)
    with pytest.raises(ValueError, match="s must be"):
        R.uniformity(w, "riesz", s=0.0)
    with pytest.raises(ValueError, match="layout"):
        R.uniformity(w, layout="cols")
    with pytest.raises(ValueError, match="block"):
        R.uniformity(w, block=1)
    with pytest.raises(TypeError, match="floating"):
        R.uniformity(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="at least 2 classes"):
        torch.ops.ltkernels.uniformity(w[:1], 0, 2.0)
    with pytest.raises(RuntimeError, match="kernel must be"):
        torch.ops.ltkernels.uniformity(w, 5, 2.0)


# ---------------------------------------------------------------------------------------------------
def test_feature_norm_penalty():
    f = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.6, 0.8]], requires_grad=True)
    ring = R.feature_norm_penalty(f, 2.0, "ring")
    assert abs(float(ring.detach()) - (9 + 4 + 1) / 3) < 1e-6
    hinge = R.feature_norm_penalty(f, 2.0, "hinge", reduction="none")
    torch.testing.assert_close(hinge, torch.tensor([0.0, 2.0, 1.0]))
    ring.backward()
    assert torch.isfinite(f.grad).all() and float(f.grad[1].abs().sum()) == 0.0
    with pytest.raises(ValueError):
        R.feature_norm_penalty(f, 1.0, "square")


@pytest.mark.parametrize("per_class", [False, True])
def test_decoupled_loss_fused_matches_reference(per_class):
    torch.manual_seed(0)
    C, D, N = 10, 6, 16
    counts = [100, 60, 40, 30, 20, 12, 8, 5, 3, 2]
    x = torch.randn(N, D)
    y = torch.randint(0, C, (N,))
    W = torch.randn(D, C)
    kw = dict(cls_num_list=counts, s=16.0, m=0.3, per_class_margin=per_class, lambda_u=0.5, uniformity="riesz",
              riesz_s=1.0, lambda_n=0.1, norm_mode="hinge", R=3.0)
    outs = []
    for impl in ("fused", "reference"):
        xw = x.clone().requires_grad_()
        Ww = W.clone().requires_grad_()
        cos = torch.nn.functional.normalize(xw, dim=1) @ torch.nn.functional.normalize(Ww, dim=0)
        crit = R.DecoupledRegularisedLoss(impl=impl, **kw)
        loss = crit(cos, y, weight=Ww, features=xw)
        loss.backward()
        outs.append((loss.detach(), xw.grad, Ww.grad, crit.last_terms))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(outs[0][2], outs[1][2], rtol=1e-4, atol=1e-6)
    assert set(outs[0][3]) == {"ce", "uniformity", "feature_norm"}


def test_decoupled_loss_errors():
    with pytest.raises(ValueError, match="cls_num_list"):
        R.DecoupledRegularisedLoss(per_class_margin=True)
    crit = R.DecoupledRegularisedLoss(lambda_u=1.0)
    with pytest.raises(ValueError, match="weight"):
        crit(torch.zeros(2, 3), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------------
def test_running_means_and_nc1():
    torch.manual_seed(0)
    reg = R.NC1Regulariser(num_classes=4, feat_dim=3, momentum=0.5)
    f = torch.randn(8, 3, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    loss = reg(f, y)
    mu = torch.stack([f[y == c].mean(0) for c in range(3)]).detach()
    torch.testing.assert_close(reg.state.means[:3], mu)
    assert reg.state.seen.tolist() == [True, True, True, False]
    expected = (f.detach() - mu[y]).square().sum(1).mean()
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert torch.isfinite(f.grad).all()
    # second batch: EMA with momentum 0.5 for seen classes
    f2 = torch.randn(4, 3)
    y2 = torch.tensor([0, 0, 3, 3])
    reg(f2, y2)
    torch.testing.assert_close(reg.state.means[0], 0.5 * mu[0] + 0.5 * f2[:2].mean(0))
    torch.testing.assert_close(reg.state.means[3], f2[2:].mean(0))
    torch.testing.assert_close(reg.state.means[1], mu[1])


def test_nc2_etf_zero_and_grad():
    C = 5
    etf = torch.eye(C) - 1.0 / C  # centred simplex: pairwise cosine -1/(C-1)
    assert float(R._etf_deviation(etf.double())) < 1e-12
    m = torch.randn(C, 7, dtype=torch.float64)
    z = torch.nn.functional.normalize(m - m.mean(0), dim=1)
    cos = z @ z.t()
    off = ~torch.eye(C, dtype=torch.bool)
    direct = (cos[off] + 1.0 / (C - 1)).square().mean()
    torch.testing.assert_close(R._etf_deviation(m), direct)
    reg = R.NC2Regulariser(C, 7)
    f = torch.randn(20, 7, requires_grad=True)
    y = torch.arange(20) % C
    reg(f, y).backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_nc_metrics():
    torch.manual_seed(0)
    C, D = 4, 6
    centers = torch.randn(C, D) * 5
    y = torch.arange(200) % C
    tight = centers[y] + 0.01 * torch.randn(200, D)
    loose = centers[y] + 3.0 * torch.randn(200, D)
    mt = R.neural_collapse_metrics(tight, y, C)
    ml = R.neural_collapse_metrics(loose, y, C)
    assert mt["nc1_trace_ratio"] < 1e-3 < ml["nc1_trace_ratio"]
    assert mt["nc1_pinv"] < ml["nc1_pinv"]
    etf = (torch.eye(C) - 1.0 / C)[y] + 0.0
    me = R.neural_collapse_metrics(torch.cat([etf, torch.zeros(200, 2)], 1), y, C)
    assert abs(me["nc2_cos_mean"] + 1.0 / (C - 1)) < 1e-9 and me["nc2_cos_std"] < 1e-6
    assert me["nc2_etf_dev"] < 1e-12


def test_nc_stats_sum_over_shards():
    torch.manual_seed(1)
    f = torch.randn(60, 5)
    y = torch.arange(60) % 6
    whole = R.neural_collapse_metrics(f, y, 6)
    s = R._add_stats(R.nc_stats(f[:25], y[:25], 6), R.nc_stats(f[25:], y[25:], 6))
    parts = R.nc_metrics_from_stats(s)
    for k in whole:
        assert abs(whole[k] - parts[k]) < 1e-9 * max(1.0, abs(whole[k])), k
    # trace ratio against the direct definition
    mu = torch.stack([f[y == c].mean(0) for c in range(6)]).double()
    sw = (f.double() - mu[y]).square().sum() / 60
    sb = (mu - f.double().mean(0)).square().sum() / 6
    assert abs(whole["nc1_trace_ratio"] - float(sw / sb)) < 1e-6 * float(sw / sb)


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_harness_digits_decoupled(tmp_path, impl):
    import os

    from ltkernels.train import build_config, train
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    cfg = build_config(os.path.join(repo, "configs", "digits_lt.yaml"),
                       ["method=decoupled", f"loss.impl={impl}", "num_threads=1", "model.width=4",
                        "train.tensorboard=false", "train.figures=false", "train.progress=false",
                        "optim.epochs=2", "train.max_steps_per_epoch=2", "optim.warmup_epochs=1",
                        "train.ref_check_every=1", f"output_dir={tmp_path}"])
    s = train(cfg, log=lambda *a: None)
    t = s["test"]
    assert 0 <= t["top1"] <= 100
    assert t["nc_classes"] == 10 and math.isfinite(t["nc1_trace_ratio"]) and "nc2_cos_std" in t
    assert s["stages"][0]["ref_check"]["max_loss_diff"] < 1e-4


def _ddp_worker(rank, ws, init, outdir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=ws)
    try:
        torch.manual_seed(0)
        feats = [torch.randn(12, 3, dtype=torch.float64) for _ in range(2)]
        labels = [torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 4, 4]), torch.tensor([1] * 6 + [3] * 6)]
        nc1 = R.NC1Regulariser(5, 3, momentum=0.5).double()
        nc2 = R.NC2Regulariser(5, 3, momentum=0.5).double()
        out = {}
        for step, (f, y) in enumerate(zip(feats, labels)):
            sl = slice(rank * 6, (rank + 1) * 6)
            x = f[sl].clone().requires_grad_()
            (nc1(x, y[sl]) + nc2(x, y[sl])).backward()
            out[f"grad{step}"] = x.grad
        out["m1"], out["m2"] = nc1.state.means.clone(), nc2.state.means.clone()
        out["nc"] = R.nc_metrics_from_stats({k: v.clone() for k, v in _allreduced_stats(feats[0][rank * 6:(rank + 1) * 6],
                                                                                          labels[0][rank * 6:(rank + 1) * 6]).items()})
        torch.save(out, f"{outdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _allreduced_stats(f, y):
    s = R.nc_stats(f, y, 5)
    for v in s.values():
        torch.distributed.all_reduce(v)
    return s


def test_ddp_running_means_match_single_process(tmp_path):
    import torch.multiprocessing as mp
    init = f"file://{tmp_path}/pg"
    mp.spawn(_ddp_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    feats = [torch.randn(12, 3, dtype=torch.float64) for _ in range(2)]
    labels = [torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 4, 4]), torch.tensor([1] * 6 + [3] * 6)]
    nc1 = R.NC1Regulariser(5, 3, momentum=0.5).double()
    nc2 = R.NC2Regulariser(5, 3, momentum=0.5).double()
    grads = []
    for f, y in zip(feats, labels):
        x = f.clone().requires_grad_()
        # NC1 is a per-sample mean: the DDP ranks each average over their half, so compare 2 x rank grads
        l1 = nc1(x, y)
        (g1,) = torch.autograd.grad(l1, x)
        x2 = f.clone().requires_grad_()
        (g2,) = torch.autograd.grad(nc2(x2, y), x2)
        grads.append((g1, g2))
    whole_nc = R.neural_collapse_metrics(feats[0], labels[0], 5)
    for rank in range(2):
        o = torch.load(f"{tmp_path}/rank{rank}.pt")
        torch.testing.assert_close(o["m1"], nc1.state.means)
        torch.testing.assert_close(o["m2"], nc2.state.means)
        sl = slice(rank * 6, (rank + 1) * 6)
        for step in range(2):
            g1, g2 = grads[step]
            torch.testing.assert_close(o[f"grad{step}"], 2 * g1[sl] + g2[sl])
        for k, v in whole_nc.items():
            assert abs(o["nc"][k] - v) < 1e-9 * max(1.0, abs(v)), k
