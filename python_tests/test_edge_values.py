"""Edge values that used to give silent wrong answers, each pinned by its reproducer, plus the semantics the
package promises for non-finite input (docs/numerics.md):

* a target margin larger than the exponent range (s * m > ~87 in fp32, C = 1 always): the row max must be
  taken after the margin, or every exponential underflows and the loss is -inf;
* label smoothing with a -inf target logit: inf, as F.cross_entropy, not NaN;
* a large common offset of the logits (up to 1e30): the log-sum-exp is taken relative to the row max, so
  the offset cancels exactly as in PyTorch's log_softmax;
* NaN weights in the uniformity regulariser: NaN, as the eager reference;
* NaN in a row makes that row's loss and its whole gradient row NaN (PyTorch's rule) in the fused kernels
  and the references alike; a -inf logit (or cosine) is a masked class with gradient 0;
* float16 cosine head: gradients within the 16-bit budget of the float64 values (inf only where those exceed
  65504, e.g. the 1 / eps gradient of a zero row).

The oracle is the eager reference in float64 on the same (rounded) input. Tolerances: the fused kernels
accumulate in float32 for fp32/fp16/bf16 input, so a logit z = s x carries an absolute error of about one
float32 ulp of |z| <= s; losses and gradients are compared at rtol 1e-5 plus an absolute term of a few ulps
of s (float64: 1e-10 relative); fp16/bf16 results are rounded to their dtype once more (rtol = its eps).
"""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import ltkernels
from ltkernels import functional as LF
from ltkernels import reference as R
from ltkernels import regularisers

COUNTS10 = [500, 300, 180, 100, 64, 40, 25, 15, 9, 5]


def _counts(C):
    return [max(1, 500 // (k + 1)) for k in range(C)]


# name -> (constructor(module namespace, C, s), whether it takes injected noise, input kind)
MARGIN_LOSSES = {
    "LDAM": (lambda M, C, s: M.LDAMLoss(_counts(C), max_m=3.0, s=s), False),
    "KPS": (lambda M, C, s: M.KPSLoss(_counts(C), max_m=0.5, s=s), False),
    "GCL": (lambda M, C, s: M.GCLLoss(_counts(C), m=0.5, s=s, noise_mul=0.5), True),
    "GCLAng": (lambda M, C, s: M.GCLAngLoss(_counts(C), m=0.5, epsilon=0.1, s=s), True),
    "ArcFace": (lambda M, C, s: M.ArcFaceLoss(s=s, m=0.5), False),
    "ArcFaceEasy": (lambda M, C, s: M.ArcFaceLoss(s=s, m=0.5, easy_margin=True), False),
    "CosFace": (lambda M, C, s: M.CosFaceLoss(s=s, m=0.4), False),
}


def _tols(dtype, s):
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10 * s)
    if dtype in (torch.float16, torch.bfloat16):  # the loss is returned in the input dtype: one rounding
        return dict(rtol=torch.finfo(dtype).eps, atol=4 * 1.2e-7 * s)
    return dict(rtol=1e-5, atol=4 * 1.2e-7 * s)


def _run(crit, x, t, noise=None, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = crit(x, t, noise=noise, **kw) if noise is not None else crit(x, t, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad


def _fused_and_reference(name, x, t, s, noise=None):
    make, takes_noise = MARGIN_LOSSES[name]
    C = x.shape[1]
    nz = noise if takes_noise else None
    lf, gf = _run(make(ltkernels, C, s), x, t, nz)
    lr, gr = _run(make(R, C, s), x.double(), t, nz.double() if nz is not None else None)
    return lf, gf, lr, gr


# ---- target margin beyond the exponent range -------------------------------------------------------------
def test_reproducers_of_the_margin_underflow():
    # each of these returned -inf (gradient NaN) before the row max was taken after the margin
    out = LF.margin_cross_entropy(torch.tensor([[0.9, 0.0]]), torch.tensor([0]), scale=200.0,
                                  margin=torch.tensor([0.5, 0.5]))
    ref = R.margin_cross_entropy(torch.tensor([[0.9, 0.0]], dtype=torch.float64), torch.tensor([0]), scale=200.0,
                                 margin=torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for fused, refm, x in [
        (ltkernels.CosFaceLoss(s=300.0, m=0.4), R.CosFaceLoss(s=300.0, m=0.4), torch.tensor([[0.9]])),
        (ltkernels.LDAMLoss([50], max_m=3.0, s=30), R.LDAMLoss([50], max_m=3.0, s=30), torch.tensor([[0.5]])),
    ]:
        v = fused(x, torch.tensor([0]))
        assert torch.isfinite(v), v
        torch.testing.assert_close(v.double(), refm(x.double(), torch.tensor([0])), rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(16, 10, generator=g) * 2 - 1) * 0.9
    t = torch.arange(16) % 10
    v = ltkernels.KPSLoss([50] * 10, max_m=0.2, s=1000.0)(x, t)
    r = R.KPSLoss([50] * 10, max_m=0.2, s=1000.0)(x.double(), t)
    assert torch.isfinite(r) and r > 100
    torch.testing.assert_close(v.double(), r, **_tols(torch.float32, 1000.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("s", [30.0, 200.0, 1e3, 1e4])
@pytest.mark.parametrize("C", [1, 2, 37])
@pytest.mark.parametrize("name", sorted(MARGIN_LOSSES))
def test_margin_losses_stay_finite_when_the_margin_exceeds_the_exponent_range(name, C, s, dtype):
    g = torch.Generator().manual_seed(C)
    N = 6
    t = torch.arange(N) % C
    # cosines in (-0.9, 0.9) with the target the largest of its row: the case the margin took below the rest
    x = (torch.rand(N, C, generator=g, dtype=torch.float64) * 1.6 - 0.8)
    x[torch.arange(N), t] = 0.9
    x = x.to(dtype)
    noise = torch.randn(N, C, generator=g, dtype=torch.float64) / 3
    lf, gf, lr, gr = _fused_and_reference(name, x, t, s, noise)
    assert torch.isfinite(lr).all() and torch.isfinite(gr).all()
    assert torch.isfinite(lf).all(), f"{name}: loss {lf} where the float64 reference is {lr}"
    assert torch.isfinite(gf).all()
    tol = _tols(dtype, s)
    torch.testing.assert_close(lf.double(), lr, **tol)
    # fp16/bf16: the gradient is rounded to the input dtype
    gtol = tol if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2 * s / N)
    torch.testing.assert_close(gf.double(), gr, **gtol)


@pytest.mark.parametrize("C", [1, 3, 150])
def test_margin_underflow_in_every_row_of_a_thread_split_batch(C):
    # many rows (both threads), every one of them with the target at the max and s m = 1000
    N = 300
    t = torch.arange(N) % C
    x = torch.rand(N, C, dtype=torch.float64) * 0.5
    x[torch.arange(N), t] = 0.95
    margin = torch.full((C,), 2.0, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        xx = x.to(dtype).detach().clone().requires_grad_(True)
        out = LF.margin_cross_entropy(xx, t, scale=500.0, margin=margin, reduction="none")
        out.sum().backward()
        xr = xx.detach().double().requires_grad_(True)
        ref = R.margin_cross_entropy(xr, t, scale=500.0, margin=margin, reduction="none")
        ref.sum().backward()
        torch.testing.assert_close(out.double(), ref.detach(), **_tols(dtype, 500.0))
        torch.testing.assert_close(xx.grad.double(), xr.grad, **_tols(dtype, 500.0))


# ---- label smoothing with -inf logits --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_label_smoothing_with_a_minus_inf_logit_matches_f_cross_entropy(dtype, weighted):
    x = torch.tensor([[1.0, float("-inf"), 0.5], [0.2, float("-inf"), -0.3], [0.1, 0.7, -0.4]], dtype=dtype)
    t = torch.tensor([1, 0, 2])
    w = torch.tensor([0.5, 2.0, 1.5], dtype=dtype) if weighted else None
    for red in ("none", "sum", "mean"):
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        out = LF.cross_entropy(a, t, weight=w, reduction=red, label_smoothing=0.5)
        ref = F.cross_entropy(b, t, weight=w, reduction=red, label_smoothing=0.5)
        torch.testing.assert_close(out, ref, equal_nan=True)
        assert not torch.isnan(out).any(), out  # was NaN: -inf - -inf in the target's smoothing correction
        out.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


# ---- large common offsets --------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [1e4, -1e6, 1e12, 1e30, -1e30])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_large_common_offsets_cancel(offset, smoothing, weighted):
    # every logit shares the offset; the spread is representable next to it (fp32 ulp of the offset)
    g = torch.Generator().manual_seed(1)
    N, C = 5, 7
    ulp = torch.finfo(torch.float32).eps * abs(offset)
    spread = torch.randint(-3, 4, (N, C), generator=g).double() * ulp
    x32 = (torch.full((N, C), offset, dtype=torch.float64) + spread).float()
    t = torch.randint(0, C, (N,), generator=g)
    w = torch.rand(C, generator=g) + 0.5 if weighted else None
    out = LF.cross_entropy(x32, t, weight=w, label_smoothing=smoothing)
    # float64 oracle on the same values, with the offset removed exactly (F.cross_entropy is shift invariant)
    x64 = x32.double()
    ref = F.cross_entropy(x64 - x64.max(1, keepdim=True).values, t, weight=w.double() if weighted else None,
                          label_smoothing=smoothing)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_reproducers_of_the_offset_cancellation():
    assert LF.cross_entropy(torch.full((1, 3), 1e30), torch.tensor([1])).item() == pytest.approx(1.0986123, 1e-6)
    assert LF.cross_entropy(torch.full((1, 3), -1e6), torch.tensor([1])).item() == pytest.approx(1.0986123, 1e-6)


@pytest.mark.parametrize("spread", [1.0, 1e2, 1e4])
def test_logit_ranges_up_to_1e4(spread):
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(64, 33, generator=g, dtype=torch.float64) * 2 - 1) * spread
    t = torch.randint(0, 33, (64,), generator=g)
    for dtype in (torch.float32, torch.float64):
        a = x.to(dtype).requires_grad_(True)
        out = LF.cross_entropy(a, t, label_smoothing=0.1)
        out.backward()
        b = x.to(dtype).double().requires_grad_(True)
        ref = F.cross_entropy(b, t, label_smoothing=0.1)
        ref.backward()
        tol = _tols(dtype, spread)
        torch.testing.assert_close(out.double(), ref.detach(), **tol)
        torch.testing.assert_close(a.grad.double(), b.grad, **tol)


# ---- uniformity with NaN weights -------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["riesz", "gaussian", "log"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_uniformity_propagates_nan_weights(kernel, dtype):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(10, 8, generator=g, dtype=dtype)
    W[3, 2] = float("nan")
    Wf = W.clone().requires_grad_(True)
    Wr = W.clone().requires_grad_(True)
    v = regularisers.uniformity(Wf, kernel=kernel)
    r = regularisers.uniformity_reference(Wr, kernel=kernel)
    assert torch.isnan(r), r
    assert torch.isnan(v), f"uniformity({kernel}) of NaN weights gave {v.item()} (reference NaN)"
    v.backward()
    assert torch.isnan(Wf.grad).any()


# ---- NaN / inf input semantics ---------------------------------------------------------------------------
def _all_losses(C):
    counts = _counts(C)
    return {
        "CE": (lambda M: M.CrossEntropyLoss(), False),
        "CE_smooth": (lambda M: M.CrossEntropyLoss(label_smoothing=0.2), False),
        "LDAM": (lambda M: M.LDAMLoss(counts, s=30), False),
        "KPS": (lambda M: M.KPSLoss(counts, s=30), False),
        "LA": (lambda M: M.LogitAdjustLoss(counts), False),
        "BS": (lambda M: M.BalancedSoftmaxLoss(counts), False),
        "Focal": (lambda M: M.FocalLoss(gamma=2.0), False),
        "CB": (lambda M: M.ClassBalancedLoss(counts, beta=0.99, gamma=1.0, loss_type="focal"), False),
        "GCL": (lambda M: M.GCLLoss(counts, m=0.3, s=30), True),
        "GCLAng": (lambda M: M.GCLAngLoss(counts, m=0.3, epsilon=0.1, s=30), True),
        "ArcFace": (lambda M: M.ArcFaceLoss(s=30.0, m=0.5), False),
        "ArcFaceEasy": (lambda M: M.ArcFaceLoss(s=30.0, m=0.5, easy_margin=True), False),
        "CosFace": (lambda M: M.CosFaceLoss(s=30.0, m=0.4), False),
    }


@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), float("inf")], ids=["nan", "-inf", "inf"])
@pytest.mark.parametrize("name", sorted(_all_losses(6)))
def test_non_finite_inputs_fused_equals_reference(name, bad):
    C = 6
    make, takes_noise = _all_losses(C)[name]
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(4, C, generator=g, dtype=torch.float64) * 1.8 - 0.9)
    t = torch.tensor([1, 1, 3, 0])
    x[0, 2] = bad  # a non-target column
    x[1, 1] = bad  # the target column
    noise = torch.randn(4, C, generator=g, dtype=torch.float64) / 3 if takes_noise else None
    lf, gf = _run(make(ltkernels), x, t, noise)
    lr, gr = _run(make(R), x, t, noise)
    torch.testing.assert_close(lf, lr, equal_nan=True)
    torch.testing.assert_close(gf, gr, equal_nan=True, rtol=1e-10, atol=1e-12)
    # the rows without a bad value are unaffected
    assert torch.isfinite(gf[2:]).all()
    if bad != bad:  # NaN: PyTorch's rule, the whole row of the gradient is NaN
        assert torch.isnan(gf[:2]).all(), gf


def test_minus_inf_is_a_masked_class_in_cosine_losses():
    # a -inf cosine off the target: probability 0 and gradient 0 in the angular losses too (no 0 * inf)
    for name in ("GCLAng", "ArcFace"):
        make, takes_noise = _all_losses(4)[name]
        x = torch.tensor([[0.3, -0.2, float("-inf"), 0.1]], dtype=torch.float64)
        noise = torch.zeros(1, 4, dtype=torch.float64) if takes_noise else None
        for M in (ltkernels, R):
            lf, gf = _run(make(M), x, torch.tensor([0]), noise)
            assert torch.isfinite(lf) and torch.isfinite(gf).all(), (name, M.__name__, gf)
            assert gf[0, 2] == 0


# ---- float16 cosine head ---------------------------------------------------------------------------------
@pytest.mark.parametrize("N,D,C", [(33, 17, 2), (7, 64, 100)])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-5, 0.0])
def test_half_cosine_head_gradient_overflows_only_past_the_float16_range(N, D, C, scale):
    """float16 head with tiny and zero vectors, against float64 math on the same float16 values. The fused
    head computes in float16 (fp32 accumulation): its gradient is within the 16-bit budget of the float64
    one (docs/cosine_head.md, "Dtypes"), and inf exactly where that value exceeds float16's range (a zero
    vector's gradient is 1/eps = 1e12 times its projection). cosine_head_loss computes float16 operands
    in float32, so its gradient is the float32 gradient rounded to float16."""
    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, D, generator=g).half()
    w = torch.randn(D, C, generator=g).half()
    x[1] *= scale  # a tiny or zero feature row
    w[:, 1] *= scale  # a tiny or zero class column
    t = torch.randint(0, C, (N,), generator=g)
    crit = ltkernels.LDAMLoss([50] * C, s=30)
    u = 2.0 ** -11
    for impl in ("head", "head_loss"):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if impl == "head":
            loss = crit(ltkernels.cosine_logits(xx, ww), t)
        else:
            loss = ltkernels.cosine_head_loss(xx, ww, t, crit)
        loss.backward()
        ref_dtype = torch.float64 if impl == "head" else torch.float32
        xr, wr = x.to(ref_dtype).requires_grad_(True), w.to(ref_dtype).requires_grad_(True)
        ref = R.LDAMLoss([50] * C, s=30)(F.normalize(xr, dim=1) @ F.normalize(wr, dim=0), t)
        ref.backward()
        if impl == "head":  # float16 logits: each s cos carries up to 3u of s; a mean CE moves by twice that
            assert abs(loss.item() - ref.item()) <= 2 * 30 * 3 * u, (loss.item(), ref.item())
        else:
            torch.testing.assert_close(loss.float(), ref.detach().float(), rtol=1e-5, atol=1e-5)
        for got, want in ((xx.grad, xr.grad), (ww.grad, wr.grad)):
            want16 = want.half()
            assert torch.equal(torch.isinf(got), torch.isinf(want16)), (impl, scale)
            fin = torch.isfinite(want16)
            if impl == "head":
                # 8u of the largest finite entry (the head's budget) and as much again for the softmax of
                # logits that each carry up to 3u of s (measured: at most 6.7u over these cases)
                err = (got[fin].double() - want[fin].double()).abs().max().item()
                assert err <= 16 * u * want[fin].abs().max().item(), (scale, err)
            else:
                torch.testing.assert_close(got[fin].float(), want16[fin].float(), rtol=2e-3, atol=1e-4)


# ---- thread safety ---------------------------------------------------------------------------------------
def _concurrently(fns, threads=4, rounds=3):
    results, errors = {}, []
    barrier = threading.Barrier(threads)

    def worker(k):
        try:
            barrier.wait()
            for r in range(rounds):
                for name, fn in fns.items():
                    results[(k, r, name)] = fn()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    assert not errors, errors
    return results


def test_concurrent_calls_equal_serial_calls():
    C = 10
    g = torch.Generator().manual_seed(5)
    x = torch.rand(64, C, generator=g) * 1.8 - 0.9
    feats = torch.randn(64, 16, generator=g)
    W = torch.randn(16, C, generator=g)
    t = torch.randint(0, C, (64,), generator=g)
    seed = torch.tensor([1234], dtype=torch.int64)
    mods = {name: make(ltkernels) for name, (make, _) in _all_losses(C).items()}
    fbl = ltkernels.FeaBalLoss(COUNTS10, lambda_=60.0)
    ldam = mods["LDAM"]

    def grad_of(f, *inputs):
        inputs = [i.clone().requires_grad_(True) for i in inputs]
        out = f(*inputs)
        out.backward()
        return (out.detach(),) + tuple(i.grad for i in inputs)

    fns = {}
    for name, m in mods.items():
        if name in ("GCL", "GCLAng"):
            fns[name] = (lambda m=m: grad_of(lambda a: m(a, t, seed=seed), x))
        else:
            fns[name] = (lambda m=m: grad_of(lambda a: m(a, t), x))
    fns["FBL"] = lambda: grad_of(lambda a, f: fbl(a, f, t, 0.5), x, feats)
    fns["margin_ce"] = lambda: grad_of(lambda a: LF.margin_cross_entropy(a, t, scale=30.0, margin=0.2), x)
    fns["cross_entropy"] = lambda: grad_of(lambda a: LF.cross_entropy(a, t, label_smoothing=0.1), x)
    fns["cosine_logits"] = lambda: grad_of(lambda a, b: ltkernels.cosine_logits(a, b).square().sum(), feats, W)
    # one loss module shared by the threads: this used to raise "called its cross-entropy 2 times per call"
    fns["cosine_head_loss"] = lambda: grad_of(lambda a, b: ltkernels.cosine_head_loss(a, b, t, ldam, chunk_size=16),
                                              feats, W)
    fns["uniformity"] = lambda: grad_of(lambda b: regularisers.uniformity(b.t(), kernel="riesz"), W)
    serial = {name: fn() for name, fn in fns.items()}
    results = _concurrently(fns)
    for (k, r, name), got in results.items():
        for a, b in zip(got, serial[name]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} (thread {k}, round {r}) differs")


# ---- rows with one finite logit --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("C", [1, 2, 37, 150])
def test_rows_with_one_finite_logit_match_f_cross_entropy(dtype, smoothing, C):
    N = 4
    x = torch.full((N, C), float("-inf"), dtype=dtype)
    x[torch.arange(N), torch.arange(N) % C] = torch.tensor([3.0, -2.0, 1e4, 0.0], dtype=dtype)
    t = torch.tensor([0, 1, 2, 3]) % C  # rows 0..: the finite logit is the target; then a masked target
    t[1] = (t[1] + 1) % C if C > 1 else t[1]
    a = x.clone().requires_grad_(True)
    b = x.clone().double().requires_grad_(True)
    out = LF.cross_entropy(a, t, reduction="none", label_smoothing=smoothing)
    ref = F.cross_entropy(b, t, reduction="none", label_smoothing=smoothing)
    torch.testing.assert_close(out.double(), ref.detach(), equal_nan=True, rtol=1e-3, atol=1e-3)
    go = torch.ones(N, dtype=dtype)
    (ga,) = torch.autograd.grad(out, a, go)
    (gb,) = torch.autograd.grad(ref, b, go.double())
    torch.testing.assert_close(ga.double(), gb, equal_nan=True, rtol=1e-3, atol=1e-3)
