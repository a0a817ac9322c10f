"""The slim plain cross-entropy path: ``torch.ops.ltkernels.cross_entropy`` (7 arguments, over margin_ce) and
``ltkernels.functional.cross_entropy`` (``F.cross_entropy``'s arguments), which ``ltkernels.CrossEntropyLoss``
calls. Expected values come from ``torch.nn.functional.cross_entropy`` and the eager reference.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import devices  # noqa: F401  (ltk_device)
from test_margin_ce import F64, check_f32, class_vec, make_inputs, run, to_dev

import ltkernels
from ltkernels import functional as LF
from ltkernels import reference as R

ops = torch.ops.ltkernels
fused = LF.cross_entropy


# Parity with F.cross_entropy over reductions, weights and label smoothing (also at a shape the CPU kernel
# splits over threads): test_margin_ce.py::test_matches_torch_cross_entropy, for both functionals.


@pytest.mark.parametrize("ignore_index", [-100, 1])
def test_batch_mean_and_ignore_index_match_reference(ltk_device, ignore_index):
    x, t = make_inputs(12, 5, seed=3)
    w = class_vec(5, 0.3, 2.0, 4)
    kw = dict(weight=w, reduction="batch_mean", ignore_index=ignore_index)
    l_ref, g_ref, go = run(R.margin_cross_entropy, x, t, kw)
    l, g, _ = run(fused, x.to(ltk_device), t.to(ltk_device), to_dev(kw, ltk_device), go.to(ltk_device))
    torch.testing.assert_close(l.cpu(), l_ref, **F64)
    torch.testing.assert_close(g.cpu(), g_ref, **F64)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_float32_against_float64(ltk_device, reduction):
    x, t = make_inputs(64, 100, seed=5, spread=6.0)
    w = class_vec(100, 0.3, 2.0, 6)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    l_ref, g_ref, go = run(F.cross_entropy, x, t, kw)
    kw32 = to_dev(kw, ltk_device, torch.float32)
    l, g, _ = run(fused, x.float().to(ltk_device), t.to(ltk_device), kw32, go.float().to(ltk_device))
    assert l.dtype == torch.float32
    check_f32(l, l_ref, g, g_ref, kw, x, "fp32")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_like_cross_entropy(ltk_device, dtype):
    """Output dtype as F.cross_entropy's; values within the input type's precision of the float64 answer
    (the kernel accumulates in fp32, so the only error is the final rounding to the half type)."""
    x, t = make_inputs(32, 50, seed=8)
    xh = x.to(dtype)
    l_ref, g_ref, go = run(F.cross_entropy, xh.double(), t, dict(reduction="none"))
    l, g, _ = run(fused, xh.to(ltk_device), t.to(ltk_device), dict(reduction="none"), go.to(ltk_device))
    assert l.dtype == g.dtype == F.cross_entropy(xh, t, reduction="none").dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(l.double().cpu(), l_ref, rtol=eps, atol=eps)
    torch.testing.assert_close(g.double().cpu(), g_ref, rtol=eps, atol=eps * float(go.max()))


def test_module_uses_it_and_follows_the_input(ltk_device):
    """ltkernels.CrossEntropyLoss runs the slim op (its forward is cross_entropy) with the reference
    module's semantics, moving a CPU weight to the input's device like the other fused modules."""
    x, t = make_inputs(9, 6, seed=10)
    w = class_vec(6, 0.3, 2.0, 11)
    kw = dict(weight=w, ignore_index=2, label_smoothing=0.05, reduction="sum")
    mod, ref = ltkernels.CrossEntropyLoss(**kw), R.CrossEntropyLoss(**kw)
    l_ref, g_ref, go = run(lambda a, b: ref(a, b), x, t, {})
    l, g, _ = run(lambda a, b: mod(a, b), x.to(ltk_device), t.to(ltk_device), {}, go.to(ltk_device))
    torch.testing.assert_close(l.cpu(), l_ref, **F64)
    torch.testing.assert_close(g.cpu(), g_ref, **F64)
    calls = []
    orig = LF._CROSS_ENTROPY
    try:
        LF._CROSS_ENTROPY = type("Spy", (), {"_op": lambda self, *a: calls.append(a) or orig._op(*a)})()
        mod(x.to(ltk_device), t.to(ltk_device))
    finally:
        LF._CROSS_ENTROPY = orig
    assert len(calls) == 1 and calls[0][3:6] == (1, 2, 0.05)


def test_exported_at_top_level():
    assert ltkernels.cross_entropy is LF.cross_entropy and "cross_entropy" in ltkernels.__all__


def test_gradcheck(ltk_device):
    x, t = make_inputs(4, 5, seed=12)
    t[1] = -100
    w = class_vec(5, 0.3, 2.0, 13).to(ltk_device)
    x = x.to(ltk_device).requires_grad_(True)
    for kw in (dict(), dict(weight=w, label_smoothing=0.2), dict(weight=w, reduction="none")):
        assert torch.autograd.gradcheck(lambda inp: fused(inp, t.to(ltk_device), **kw), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["none", "weight_sum", "smoothing_ignore_mean", "no_grad"])
def test_opcheck(ltk_device, case):
    x, t = make_inputs(4, 6, seed=14)
    x = x.to(ltk_device).requires_grad_(case != "no_grad")
    w = class_vec(6, 0.3, 2.0, 15).to(ltk_device)
    args = {
        "none": (x, t.to(ltk_device), None, 0, -100, 0.0, True),
        "weight_sum": (x, t.to(ltk_device), w, 1, -100, 0.0, True),
        "smoothing_ignore_mean": (x, t.to(ltk_device), w, 2, 2, 0.1, True),
        "no_grad": (x, t.to(ltk_device), None, 2, -100, 0.0, False),
    }[case]
    torch.library.opcheck(ops.cross_entropy.default, args)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_compile_fullgraph(ltk_device, reduction):
    torch._dynamo.reset()
    x, t = make_inputs(6, 9, seed=16)
    w = class_vec(9, 0.3, 2, 17).to(ltk_device)
    mod = ltkernels.CrossEntropyLoss(weight=w, reduction=reduction, label_smoothing=0.1)

    def f(inp, tgt):
        return fused(inp, tgt, weight=w, reduction=reduction) + 0.5 * mod(inp, tgt)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1, x2 = (x.to(ltk_device).requires_grad_(True) for _ in range(2))
    le, lc = f(x1, t.to(ltk_device)), cf(x2, t.to(ltk_device))
    go = torch.rand_like(le) + 0.5
    (ge,) = torch.autograd.grad(le, x1, go)
    (gc,) = torch.autograd.grad(lc, x2, go)
    torch.testing.assert_close(lc, le, rtol=0, atol=0)
    torch.testing.assert_close(gc, ge, rtol=1e-14, atol=1e-14)


def test_bad_input_raises_clearly():
    x, t = make_inputs(4, 5)
    with pytest.raises(TypeError, match="must be tensors"):
        fused(x.tolist(), t)
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        fused(x, t.float())
    with pytest.raises(TypeError, match="floating-point"):
        fused(x.long(), t)
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        fused(x, t[:3])
    with pytest.raises(ValueError, match="2-D"):
        fused(x[0], t[:1])
    with pytest.raises(ValueError, match="0 classes"):
        fused(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused(x, t, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        fused(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight must be a 1-D tensor of length 5"):
        fused(x, t, weight=torch.ones(4))
    with pytest.raises(ValueError, match="weight is on meta but the input is on cpu"):
        fused(x, t, weight=torch.ones(5, device="meta"))
    with pytest.raises(ValueError, match="target is on meta"):
        fused(x, t.to("meta"))
    tb = t.clone()
    tb[1] = 5
    with pytest.raises(IndexError, match="target 5 .*out of range"):
        fused(x, tb)
    # an int32 target is accepted (converted), like F.cross_entropy's
    torch.testing.assert_close(fused(x, t.int()), F.cross_entropy(x, t), **F64)


def test_op_level_checks():
    """The op checks too, for callers that bypass the functional."""
    x, t = make_inputs(4, 5)
    with pytest.raises(ValueError, match="target must be int64"):
        ops.cross_entropy(x, t.int(), None, 2, -100, 0.0, False)
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\)"):
        ops.cross_entropy(x, t, torch.ones(3, dtype=torch.float64), 2, -100, 0.0, False)
    with pytest.raises(ValueError, match="unknown reduction"):
        ops.cross_entropy(x, t, None, 7, -100, 0.0, False)
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.cross_entropy(x, t, None, 2, -100, 2.0, False)
