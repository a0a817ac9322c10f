"""Tests for ltkernels.priors against independent hand computations (math / numpy)."""

import math

import numpy as np
import pytest
import torch

from ltkernels import priors as P

COUNTS = [500, 120, 37, 9, 2]  # descending, not log-linear
UNSORTED = [9, 500, 2, 120, 37]


def _close(actual, expected, tol=1e-12):
    assert isinstance(actual, torch.Tensor)
    assert actual.dtype == torch.float64 and actual.device.type == "cpu"
    np.testing.assert_allclose(actual.numpy(), np.asarray(expected, dtype=np.float64),
                               rtol=tol, atol=tol)


def _loglinear(C=10, n_max=5000.0, imb=100.0):
    # CIFAR-LT profile without the int() truncation: exactly log-linear, descending
    return [n_max * (1.0 / imb) ** (i / (C - 1)) for i in range(C)]


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("inp", [COUNTS, tuple(COUNTS), np.array(COUNTS), np.array(COUNTS, np.int32),
                                 torch.tensor(COUNTS), torch.tensor(COUNTS, dtype=torch.float32)])
def test_counts_tensor_accepts_types(inp):
    _close(P.counts_tensor(inp), COUNTS, 0)


def test_counts_tensor_does_not_alias_input():
    arr = np.array(COUNTS, dtype=np.float64)
    t = P.counts_tensor(arr)
    t[0] = -1
    assert arr[0] == 500


@pytest.mark.parametrize(
    "bad, msg",
    [
        ([], "must not be empty"),
        ([[1, 2], [3, 4]], "must be 1-D"),
        (5, "must be 1-D"),
        ([3, 2, 1, 0], "class count must be positive, got 0 for class 3"),
        ([3, -2, 1], "class count must be positive, got -2 for class 1"),
        ([3, float("nan"), 1], "must be finite, got nan for class 1"),
        ([3, 4, float("inf")], "must be finite, got inf for class 2"),
    ],
)
def test_counts_tensor_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        P.counts_tensor(bad)


def test_counts_validation_reaches_every_function():
    fns = [P.ldam_margins, P.kps_radius, lambda n: P.kps_margins(n), P.kps_target_scale,
           P.log_prior, P.class_balanced_weights, lambda n: P.drw_weights(n, 170),
           P.cloud_sizes, P.fbl_lambda, lambda n: P.sampler_class_weights(n, "cben")]
    for fn in fns:
        with pytest.raises(ValueError, match="got 0 for class 2"):
            fn([5, 3, 0])


def test_non_numeric_is_type_error():
    with pytest.raises(TypeError):
        P.counts_tensor(["a", "b"])


# ------------------------------------------------------------------ LDAM
def test_ldam_margins_hand():
    # n^{-1/4} = 1, 1/2, 1/3, 1/4 -> scaled to max 0.5
    _close(P.ldam_margins([1, 16, 81, 256]), [0.5, 0.25, 0.5 / 3, 0.125])
    m = P.ldam_margins(COUNTS, max_m=0.3)
    expected = [c ** -0.25 for c in COUNTS]
    expected = [e * 0.3 / max(expected) for e in expected]
    _close(m, expected)
    assert m.max().item() == pytest.approx(0.3, abs=1e-15)
    assert bool((m[1:] > m[:-1]).all())  # rarer -> larger margin
    _close(P.ldam_margins([7, 7, 7]), [0.5, 0.5, 0.5])


# ------------------------------------------------------------------ KPS
def test_kps_radius_hand_and_range():
    nmin = min(COUNTS)
    _close(P.kps_radius(COUNTS), [math.log(50 * c / nmin) / math.log(50) for c in COUNTS])
    r = P.kps_radius(COUNTS)
    assert r.min().item() == pytest.approx(1.0, abs=1e-15)
    assert r.max().item() == pytest.approx(1 + math.log(500 / 2) / math.log(50), abs=1e-13)
    _close(P.kps_radius([3, 3]), [1.0, 1.0])


def test_kps_margins_thesis_and_flip_hand():
    nmin = min(UNSORTED)
    r = [math.log(50 * c / nmin) / math.log(50) for c in UNSORTED]
    thesis = [max(r) + 1 - x for x in r]
    flip = r[::-1]
    for mp_expected, flag in ((thesis, False), (flip, True)):
        m, mp = P.kps_margins(UNSORTED, max_m=0.2, flip_compat=flag)
        _close(mp, mp_expected)
        _close(m, [x * 0.2 / max(mp_expected) for x in mp_expected])
    # on unsorted counts the two disagree (the official flip is by index, not by frequency)
    assert not torch.allclose(P.kps_margins(UNSORTED)[1], P.kps_margins(UNSORTED, flip_compat=True)[1])
    # thesis: rarest class gets the largest margin, most frequent m' = 1
    m, mp = P.kps_margins(UNSORTED)
    assert int(mp.argmax()) == UNSORTED.index(min(UNSORTED))
    assert mp.min().item() == pytest.approx(1.0, abs=1e-14)


def test_kps_flip_compat_equals_thesis_for_descending_loglinear():
    counts = _loglinear(C=10, imb=100.0)
    for max_m in (0.5, 0.2):
        a = P.kps_margins(counts, max_m)
        b = P.kps_margins(counts, max_m, flip_compat=True)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-13)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-13)


def test_kps_target_scale_hand():
    # IF = 2500 = 50^2 -> r in [1, 3], m' (thesis) in [1, 3]
    counts = [5000.0, 500.0, 50.0, 2.0]
    r = [math.log(50 * c / 2.0) / math.log(50) for c in counts]
    mp = [max(r) + 1 - x for x in r]
    for s in (15.0, 30.0):
        _close(P.kps_target_scale(counts, s=s), [min(max(s * x, s), 50.0) for x in mp])
    ts = P.kps_target_scale(counts, s=30.0)
    assert ts[0].item() == 30.0 and ts[-1].item() == 50.0  # clamped both sides
    # official-code flip variant uses the flipped radius
    _close(P.kps_target_scale(counts, s=15.0, flip_compat=True),
           [min(max(15.0 * x, 15.0), 50.0) for x in r[::-1]])
    # s > 50: torch.clamp(min > max) -> everything 50
    _close(P.kps_target_scale(counts, s=60.0), [50.0] * 4)


# ------------------------------------------------------------------ logit adjustment
def test_log_prior_hand():
    tot = sum(COUNTS)
    _close(P.log_prior(COUNTS), [math.log(c / tot + 1e-12) for c in COUNTS])
    _close(P.log_prior(COUNTS, eps=0.0), [math.log(c / tot) for c in COUNTS])


# ------------------------------------------------------------------ class-balanced / DRW
def _cb_hand(counts, beta):
    w = [(1 - beta) / (1 - beta ** c) for c in counts]
    return [x / sum(w) * len(counts) for x in w]


@pytest.mark.parametrize("beta", [0.9999, 0.99, 0.9])
def test_class_balanced_weights_hand(beta):
    w = P.class_balanced_weights(COUNTS, beta)
    _close(w, _cb_hand(COUNTS, beta), 1e-11)
    assert w.sum().item() == pytest.approx(len(COUNTS), rel=1e-14)
    assert bool((w[1:] > w[:-1]).all())


def test_class_balanced_weights_edge():
    _close(P.class_balanced_weights(COUNTS, 0.0), [1.0] * 5)
    _close(P.class_balanced_weights([4, 4, 4], 0.9999), [1.0] * 3)
    with pytest.raises(ValueError, match="beta must be in"):
        P.class_balanced_weights(COUNTS, 1.0)


def test_drw_weights():
    ones = [1.0] * 5
    _close(P.drw_weights(COUNTS, 0), ones)
    _close(P.drw_weights(COUNTS, 159), ones)
    cb = _cb_hand(COUNTS, 0.9999)
    for ep in (160, 199, 400):
        _close(P.drw_weights(COUNTS, ep), cb, 1e-11)
    _close(P.drw_weights(COUNTS, 79, drw_epoch=80), ones)
    _close(P.drw_weights(COUNTS, 80, drw_epoch=80, beta=0.999), _cb_hand(COUNTS, 0.999), 1e-11)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        P.drw_weights(COUNTS, -1)


# ------------------------------------------------------------------ GCL / FBL
def test_cloud_sizes_hand():
    lm = [math.log(c) for c in COUNTS]
    d = [max(lm) - x for x in lm]
    _close(P.cloud_sizes(COUNTS), [x / max(d) for x in d])
    cs = P.cloud_sizes(UNSORTED)
    assert cs[UNSORTED.index(500)].item() == 0.0 and cs[UNSORTED.index(2)].item() == 1.0
    assert bool(((cs >= 0) & (cs <= 1)).all())


def test_fbl_lambda_hand():
    nmax, nmin = max(UNSORTED), min(UNSORTED)
    _close(P.fbl_lambda(UNSORTED),
           [(math.log(nmax) - math.log(c)) / (math.log(nmax) - math.log(nmin)) for c in UNSORTED])
    torch.testing.assert_close(P.fbl_lambda(COUNTS), P.cloud_sizes(COUNTS), rtol=0, atol=1e-15)


@pytest.mark.parametrize("fn", [P.cloud_sizes, P.fbl_lambda])
def test_all_equal_counts_give_zero_not_nan(fn):
    for counts in ([7, 7, 7, 7], [1.0], [3]):
        out = fn(counts)
        assert not torch.isnan(out).any()
        _close(out, [0.0] * len(counts), 0)


def test_fbl_alpha():
    assert P.fbl_alpha(0, 200) == 0.0
    assert P.fbl_alpha(95, 200) == pytest.approx(0.25, abs=1e-15)
    assert P.fbl_alpha(190, 200) == pytest.approx(1.0, abs=1e-15)
    assert P.fbl_alpha(199, 200) == pytest.approx((199 / 190) ** 2, abs=1e-15)
    assert P.fbl_alpha(199, 200) > 1.0
    with pytest.raises(ValueError, match="total_epochs must be > 10"):
        P.fbl_alpha(0, 10)
    with pytest.raises(ValueError, match="epoch must be"):
        P.fbl_alpha(-1, 200)


# ------------------------------------------------------------------ samplers
def test_sampler_class_weights_hand():
    _close(P.sampler_class_weights(COUNTS, "instance"), [1.0] * 5)
    _close(P.sampler_class_weights(COUNTS, "class_balanced"), [1 / c for c in COUNTS])
    _close(P.sampler_class_weights(COUNTS, "sqrt"), [1 / math.sqrt(c) for c in COUNTS])
    _close(P.sampler_class_weights(COUNTS, "effective_number"),
           [(1 - 0.9999) / (1 - 0.9999 ** c) for c in COUNTS], 1e-11)
    _close(P.sampler_class_weights(COUNTS, "effective_number", beta=0.99),
           [(1 - 0.99) / (1 - 0.99 ** c) for c in COUNTS], 1e-11)


@pytest.mark.parametrize("a, b", [(0.9999, 1e-5), (0.999, 0.0009)])
def test_sampler_cben_hand(a, b):
    lm = [math.log(c) for c in UNSORTED]
    d = [max(lm) - x for x in lm]
    dh = [(x - min(d)) / (max(d) - min(d)) for x in d]
    betas = [a + b * x for x in dh]
    expected = [(1 - bj) / (1 - bj ** c) for bj, c in zip(betas, UNSORTED)]
    _close(P.sampler_class_weights(UNSORTED, "cben", cben_a=a, cben_b=b), expected, 1e-10)


def test_sampler_cben_all_equal_and_errors():
    out = P.sampler_class_weights([5, 5, 5], "cben")
    _close(out, [(1 - 0.9999) / (1 - 0.9999 ** 5)] * 3, 1e-11)
    with pytest.raises(ValueError, match=r"allowed kinds: instance, class_balanced, sqrt, "
                                         r"effective_number, cben"):
        P.sampler_class_weights(COUNTS, "class_aware")
    with pytest.raises(ValueError, match="cben betas"):
        P.sampler_class_weights(COUNTS, "cben", cben_a=0.9999, cben_b=0.01)
