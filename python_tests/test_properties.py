"""Property-based tests (Hypothesis) of the public ops against the eager references in float64.

Drawn: shapes (N = 0/1/small, C = 1/2/odd/up to 20000), dtypes, memory layouts (transposed, sliced,
expanded), scales, class counts (single class, all equal, long-tailed, and zeros, which must be refused by
fused and reference alike), weights, ignore_index, label smoothing, and grad_output kinds. Each test has a
fixed example budget and a fixed seed (derandomized, no example database), so a CI run is reproducible and
bounded; failing examples that a run finds are kept below as explicit ``@example`` regressions.

Tolerances, by the dtype of the input (the oracle sees the same rounded values in float64):
* float64: 1e-9 relative (the kernels accumulate in float64);
* float32: 2e-5 relative plus a few float32 ulps of the largest logit |s x| (each logit is rounded once, and
  a logit error dz moves the gradient by about its largest element times dz);
* float16 / bfloat16: the result is rounded to the dtype once more (the oracle is rounded the same way, so
  a sum past 65504 is inf in both): 2 eps relative, and 2 eps of the largest gradient element absolute.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ltkernels  # noqa: E402
from ltkernels import functional as LF  # noqa: E402
from ltkernels import reference as R  # noqa: E402
from ltkernels import regularisers  # noqa: E402

# LTK_PROPERTY_EXAMPLES raises the budget for a longer local campaign
BUDGET = settings(max_examples=int(os.environ.get("LTK_PROPERTY_EXAMPLES", "100")), deadline=None, derandomize=True, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _eps(dtype):
    return torch.finfo(dtype).eps


def _tol(dtype, magnitude=1.0, grad_max=None):
    """Tolerance for a loss whose logits are up to `magnitude` in size, or (grad_max given) for its gradient,
    whose largest element is grad_max: a logit error dz moves a probability by p dz, so the gradient's
    absolute error is about grad_max times the logit error (see the module docstring)."""
    acc_eps = 1e-12 if dtype == torch.float64 else 4 * _eps(torch.float32)
    logit_err = acc_eps * max(1.0, magnitude)
    if grad_max is None:
        atol = logit_err
    else:
        atol = logit_err * max(grad_max, 1.0)  # (a zero reference gradient, e.g. C = 1: exp(0) = 1 + ulp)
    rtol = 1e-9 if dtype == torch.float64 else 2e-5
    if dtype in (torch.float16, torch.bfloat16):  # rounded once more to the dtype
        rtol = 2 * _eps(dtype)
        atol = max(atol, 2 * _eps(dtype) * (grad_max or 0.0))
    return dict(rtol=rtol, atol=atol)


# ---- drawing inputs -----------------------------------------------------------------------------------
@st.composite
def shapes(draw, max_c=20000):
    n = draw(st.sampled_from([0, 1, 2, 3, 7, 16, 33]))
    c = draw(st.one_of(st.sampled_from([1, 2, 3, 5, 17, 100, 129]), st.integers(1, 300),
                       st.sampled_from([4097, max_c])))
    if c > 1000:  # wide rows: keep the batch small (the float64 oracle is eager)
        n = min(n, 3)
    return n, c


@st.composite
def laid_out(draw, n, c, dtype, lo=-1.0, hi=1.0):
    """(leaf, view): `view` is an (n, c) tensor in one of several layouts whose values come from `leaf`,
    the tensor the gradient is taken against."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))

    def rnd(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)

    if layout == "contiguous":
        leaf = rnd(n, c).requires_grad_(True)
        return leaf, (lambda t: t), layout
    if layout == "transposed":
        leaf = rnd(c, n).requires_grad_(True)
        return leaf, (lambda t: t.t()), layout
    if layout == "sliced":
        leaf = rnd(n + 1, 2 * c + 1).requires_grad_(True)
        return leaf, (lambda t: t[1:, 1::2]), layout
    leaf = rnd(1, c).requires_grad_(True)
    return leaf, (lambda t: t.expand(n, c)), layout


def _targets(draw, n, c, ignore):
    t = torch.tensor(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)), dtype=torch.int64)
    if ignore and n:
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        t[mask] = -100
    return t


@st.composite
def grad_outputs(draw, shape, dtype):
    kind = draw(st.sampled_from(["ones", "random", "zeros", "expanded", "negated"]))
    if kind == "ones":
        return torch.ones(shape, dtype=dtype), kind
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype), kind
    if kind == "expanded":
        return torch.tensor(1.5, dtype=dtype).expand(shape), kind
    if kind == "negated":
        return torch.ones(shape, dtype=dtype).neg(), kind
    seed = draw(st.integers(0, 2**31 - 1))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype), kind


def _grads(fn, leaf, view, go):
    x = leaf.detach().clone().requires_grad_(True)
    out = fn(view(x))
    (g,) = torch.autograd.grad(out, x, go.to(out.dtype)) if out.requires_grad else (torch.zeros_like(x),)
    return out.detach(), g


def _gmax(g):
    return float(g.abs().max()) if g.numel() else 0.0


def _assert_close(got, want, tol, what):
    if got.dtype in (torch.float16, torch.bfloat16):  # the oracle rounded like the result (inf past 65504)
        want = want.to(got.dtype)
    torch.testing.assert_close(got.double(), want.double(), equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)


# ---- plain cross-entropy -------------------------------------------------------------------------------
@BUDGET
@given(data=st.data(), shape=shapes(), dtype=st.sampled_from(DTYPES),
       reduction=st.sampled_from(["none", "sum", "mean"]), weighted=st.booleans(), ignore=st.booleans(),
       smoothing=st.sampled_from([0.0, 0.0, 0.1, 1.0]), spread=st.sampled_from([1.0, 30.0, 1e4]))
def test_cross_entropy_matches_f_cross_entropy(data, shape, dtype, reduction, weighted, ignore, smoothing, spread):
    n, c = shape
    leaf, view, layout = data.draw(laid_out(n, c, dtype, -spread, spread))
    t = _targets(data.draw, n, c, ignore)
    w = (torch.rand(c, generator=torch.Generator().manual_seed(c)) + 0.25) if weighted else None
    go, _ = data.draw(grad_outputs((n,) if reduction == "none" else (), dtype))
    out, g = _grads(lambda x: LF.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=smoothing),
                    leaf, view, go)
    ref, gr = _grads(lambda x: F.cross_entropy(x, t, weight=None if w is None else w.double(), reduction=reduction,
                                               label_smoothing=smoothing), leaf.double(), view, go.double())
    assert out.dtype == dtype
    _assert_close(out, ref, _tol(dtype, spread), f"loss ({layout})")
    _assert_close(g, gr, _tol(dtype, spread, _gmax(gr)), f"grad ({layout})")


# ---- the fused margin cross-entropy --------------------------------------------------------------------
# per-class vectors drawn uniformly in these ranges (target_scale in units of the scale)
VECTOR_RANGES = {"col_scale": (0.5, 1.5), "col_bias": (-2, 2), "margin": (0, 0.8), "target_scale": (0.5, 2),
                 "weight": (0.2, 3)}

@BUDGET
@given(data=st.data(), shape=shapes(max_c=8142), dtype=st.sampled_from(DTYPES),
       scale=st.sampled_from([1.0, 16.0, 64.0, 1e3, 1e4]),
       features=st.sets(st.sampled_from(["col_scale", "col_bias", "margin", "target_scale", "weight"])),  # VECTOR_RANGES
       reduction=st.sampled_from(["none", "sum", "mean", "batch_mean"]), ignore=st.booleans(),
       extra=st.sampled_from(["none", "smoothing", "focal", "focal_full"]))
@example(data=None, shape=(1, 1), dtype=torch.float32, scale=1e4, features={"margin"}, reduction="mean",
         ignore=False, extra="none")  # C = 1, s m far beyond the exponent range: was -inf
def test_margin_cross_entropy_matches_reference(data, shape, dtype, scale, features, reduction, ignore, extra):
    n, c = shape
    if data is None:  # the explicit example: a fixed input
        leaf = torch.full((n, c), 0.5, dtype=dtype, requires_grad=True)
        view, t = (lambda x: x), torch.zeros(n, dtype=torch.int64)
        go = torch.ones(())
    else:
        leaf, view, _ = data.draw(laid_out(n, c, dtype))
        t = _targets(data.draw, n, c, ignore)
        go, _ = data.draw(grad_outputs((n,) if reduction == "none" else (), dtype))
    g = torch.Generator().manual_seed(n * 7919 + c)
    vec = lambda lo, hi: torch.rand(c, generator=g, dtype=torch.float64) * (hi - lo) + lo  # noqa: E731
    kw = dict(scale=scale, reduction=reduction, **{f: vec(*VECTOR_RANGES[f]) for f in sorted(features)})
    if "target_scale" in kw:
        kw["target_scale"] = kw["target_scale"] * scale
    if extra == "smoothing":
        kw["label_smoothing"] = 0.2
    elif extra.startswith("focal"):
        kw["focal_gamma"] = 2.0
        kw["focal_detach"] = extra == "focal"
        if reduction == "mean" and "weight" in kw:
            kw["reduction"] = "batch_mean"
    out, gx = _grads(lambda x: LF.margin_cross_entropy(x, t, **kw), leaf, view, go)
    ref, gr = _grads(lambda x: R.margin_cross_entropy(x, t, **kw), leaf.double(), view, go.double())
    mag = scale * 4.0 * (2.0 if "target_scale" in features else 1.0)
    _assert_close(out, ref, _tol(dtype, mag), "loss")
    _assert_close(gx, gr, _tol(dtype, mag, _gmax(gr)), "grad")


# ---- loss modules from class counts --------------------------------------------------------------------
MODULES = {
    "LDAMLoss": dict(max_m=0.5, s=30), "KPSLoss": dict(max_m=0.5, s=30), "KPSLoss_weighted": dict(weighted=True),
    "LogitAdjustLoss": dict(tau=1.0), "BalancedSoftmaxLoss": {}, "ClassBalancedLoss": dict(beta=0.99),
    "ClassBalancedLoss_focal": dict(beta=0.999, loss_type="focal", gamma=1.0), "GCLLoss": dict(m=0.2, s=30),
    "GCLAngLoss": dict(m=0.2, s=30, epsilon=0.1), "GCLLoss_focal": dict(train_cls=True, gamma=1.5),
}


@st.composite
def class_counts(draw):
    kind = draw(st.sampled_from(["single", "equal", "long_tail", "random", "with_zero"]))
    if kind == "single":
        return [draw(st.integers(1, 5000))]
    c = draw(st.integers(2, 120))
    if kind == "equal":
        return [draw(st.integers(1, 500))] * c
    if kind == "long_tail":
        imb = draw(st.sampled_from([10, 100, 256]))
        return [max(1, int(5000 * imb ** (-k / (c - 1)))) for k in range(c)]
    counts = draw(st.lists(st.integers(1, 5000), min_size=c, max_size=c))
    if kind == "with_zero":
        counts[draw(st.integers(0, c - 1))] = 0
    return counts


@BUDGET
@given(data=st.data(), name=st.sampled_from(sorted(MODULES)), counts=class_counts(),
       dtype=st.sampled_from([torch.float32, torch.float64]), n=st.sampled_from([0, 1, 5, 32]))
def test_loss_modules_match_their_references(data, name, counts, dtype, n):
    cls = name.split("_")[0]
    kw = MODULES[name]
    errors = []
    mods = []
    for M in (ltkernels, R):
        try:
            mods.append(getattr(M, cls)(counts, **kw))
        except Exception as e:
            errors.append(type(e))
    if errors:  # zero counts: refused by both, with the same exception
        assert len(errors) == 2 and errors[0] is errors[1], errors
        assert 0 in counts
        return
    assert 0 not in counts
    c = len(counts)
    leaf, view, layout = data.draw(laid_out(n, c, dtype, -0.95, 0.95))
    t = _targets(data.draw, n, c, False)
    noise = torch.randn(n, c, generator=torch.Generator().manual_seed(c), dtype=torch.float64) / 3
    call = (lambda m: (lambda x: m(x, t, noise=noise.to(x.dtype)))) if cls.startswith("GCL") else \
        (lambda m: (lambda x: m(x, t)))
    go = torch.tensor(1.0)
    out, g = _grads(call(mods[0]), leaf, view, go)
    ref, gr = _grads(call(mods[1]), leaf.double(), view, go.double())
    _assert_close(out, ref, _tol(dtype, 60.0), f"{name} loss ({layout})")
    _assert_close(g, gr, _tol(dtype, 60.0, _gmax(gr)), f"{name} grad ({layout})")


# ---- cosine head and uniformity ------------------------------------------------------------------------
@BUDGET
@given(data=st.data(), n=st.sampled_from([0, 1, 5, 33]), d=st.sampled_from([1, 3, 17, 64]),
       c=st.sampled_from([1, 2, 7, 100, 1000]), dtype=st.sampled_from([torch.float32, torch.float64]),
       layout=st.sampled_from(["in_out", "out_in"]), zero_rows=st.booleans(), chunk=st.sampled_from([None, 1, 4]))
def test_cosine_head_and_head_loss_match_eager(data, n, d, c, dtype, layout, zero_rows, chunk):
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, c, generator=g, dtype=torch.float64)
    if zero_rows and n:
        x[0] = 0
        w[:, 0] = 0
    t = torch.randint(0, c, (n,), generator=g)
    wl = w if layout == "in_out" else w.t().contiguous()

    def fused(xx, ww):
        crit = ltkernels.LDAMLoss([100] * c, s=16)
        if chunk is None:
            return crit(ltkernels.cosine_logits(xx, ww, layout=layout), t)
        return ltkernels.cosine_head_loss(xx, ww, t, crit, chunk_size=chunk, layout=layout)

    cos_holder = []

    def eager(xx, ww):
        wi = ww if layout == "in_out" else ww.t()
        cos = F.normalize(xx, dim=1, eps=1e-12) @ F.normalize(wi, dim=0, eps=1e-12)
        cos.retain_grad()
        cos_holder.append(cos)
        return R.LDAMLoss([100] * c, s=16)(cos, t)

    xa, wa = x.to(dtype).requires_grad_(True), wl.to(dtype).requires_grad_(True)
    out = fused(xa, wa)
    xb, wb = x.to(dtype).double().requires_grad_(True), wl.to(dtype).double().requires_grad_(True)
    ref = eager(xb, wb)
    _assert_close(out.detach(), ref.detach(), _tol(dtype, 16.0), "loss")
    if n == 0:
        return
    out.backward()
    ref.backward()
    # The gradients are tangent projections of G = dL/dcos scaled by 1 / norm; the rounding error is relative
    # to the unprojected size |G| / norm (D = 1: the projection cancels it entirely), and a zero row's
    # gradient is 1/eps = 1e12 times its projection.
    G = cos_holder[0].grad.abs()
    xn = xb.detach().norm(dim=1).clamp_min(1e-12)
    wn = (wb.detach() if layout == "in_out" else wb.detach().t()).norm(dim=0).clamp_min(1e-12)
    gx_scale = max(_gmax(xb.grad), float((G.sum(1) / xn).max()))
    gw_scale = max(_gmax(wb.grad), float((G.sum(0) / wn).max()))
    _assert_close(xa.grad, xb.grad, _tol(dtype, 16.0, gx_scale), "feature grad")
    _assert_close(wa.grad, wb.grad, _tol(dtype, 16.0, gw_scale), "weight grad")


@BUDGET
@given(data=st.data(), c=st.sampled_from([2, 3, 10, 65]), d=st.sampled_from([1, 2, 8, 33]),
       kernel=st.sampled_from(["gaussian", "riesz", "log"]), dtype=st.sampled_from([torch.float32, torch.float64]),
       special=st.sampled_from(["none", "duplicate", "zero", "nan"]))
def test_uniformity_matches_reference(data, c, d, kernel, dtype, special):
    seed = data.draw(st.integers(0, 2**31 - 1))
    W = torch.randn(c, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if special == "duplicate":
        W[1] = W[0]
    elif special == "zero":
        W[0] = 0
    elif special == "nan":
        W[c - 1, d - 1] = math.nan
    if special == "duplicate" and dtype == torch.float32 and kernel != "gaussian":
        # two equal rows: float64 clamps their distance to dist_eps (1e-12), float32's Gram-based distance
        # leaves ~1e-7, and d^-s / log d of those differ by orders of magnitude (bounded for the gaussian)
        return
    Wa = W.to(dtype).requires_grad_(True)
    Wb = W.to(dtype).double().requires_grad_(True)
    out = regularisers.uniformity(Wa, kernel=kernel)
    ref = regularisers.uniformity_reference(Wb, kernel=kernel)
    if special == "nan":
        assert torch.isnan(out) and torch.isnan(ref)
        return
    # d2 = |w^_j|^2 + |w^_k|^2 - 2 w^_j . w^_k (the Gram form) carries an absolute error e of a few ulps of 1;
    # the riesz and log energies amplify it by 1 / d2 of the closest pair, the gaussian's exponent by t = 2
    with torch.no_grad():
        wh = F.normalize(Wb, dim=1)
        d2 = torch.cdist(wh, wh).square() + torch.eye(c, dtype=torch.float64) * 4
        amp = 2.0 if kernel == "gaussian" else 1.0 / max(float(d2.min()), 1e-12)
    e = 1e-13 if dtype == torch.float64 else 16 * _eps(torch.float32)
    if e * amp > 1e-2:
        # two classes closer than the dtype resolves (float32: d2 < ~1e-4): the energy has no correct digits
        # in that dtype, the eager op's float32 value included (docs/numerics.md); it must still be finite
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(Wa.grad).all()
        return
    vtol = dict(rtol=2e-5 + e * amp, atol=e * amp)
    _assert_close(out.detach(), ref.detach(), vtol, "value")
    out.backward()
    ref.backward()
    g = _gmax(Wb.grad)
    _assert_close(Wa.grad, Wb.grad, dict(rtol=2e-5 + e * amp, atol=e * amp * max(g, 1.0)), "grad")
