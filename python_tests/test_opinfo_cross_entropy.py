"""PyTorch's own OpInfo samples for ``nn.functional.cross_entropy`` (torch.testing._internal's op_db) run
against ``ltkernels.functional.cross_entropy``.

* Every sample of a supported form ((N, C) input, class-index target) equals F.cross_entropy, value and
  gradient, in every dtype the OpInfo lists.
* Every unsupported form (K-dimensional input, class-probability targets, unbatched input) is a clear error
  that says what to do instead.
* Every bad argument that F.cross_entropy refuses, ours refuses too, with an exception that
  ``except <PyTorch's exception class>`` catches (the OpInfo defines no error inputs for this op; the list
  below is PyTorch's checks, each confirmed against F.cross_entropy in the test itself). Ours refuses a
  negative label_smoothing too, which F.cross_entropy silently accepts (test_cross_entropy.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ltkernels import functional as LF

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def opinfo():
    from torch.testing._internal.common_methods_invocations import op_db  # slow import: once per module

    (op,) = [o for o in op_db if o.name == "nn.functional.cross_entropy" and o.variant_test_name == ""]
    return op


def _supported(sample) -> bool:
    target = sample.args[0]
    return sample.input.dim() == 2 and not target.is_floating_point()


def _tol(dtype):
    # the fused kernel accumulates in fp32 (fp64 for fp64); F.cross_entropy on CPU accumulates fp16/bf16 in
    # fp32 as well: both results are rounded once to the dtype
    return {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
            torch.float16: dict(rtol=2e-3, atol=1e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_supported_samples_equal_f_cross_entropy(opinfo, dtype):
    assert dtype in opinfo.dtypes
    samples = list(opinfo.sample_inputs("cpu", dtype, requires_grad=True))
    supported = [s for s in samples if _supported(s)]
    assert len(supported) >= 8, "the OpInfo's 2-D class-index samples went missing"
    for s in supported:
        target = s.args[0]
        x1 = s.input.detach().clone().requires_grad_(True)
        x2 = s.input.detach().clone().requires_grad_(True)
        out = LF.cross_entropy(x1, target, **s.kwargs)
        ref = F.cross_entropy(x2, target, **s.kwargs)
        assert out.dtype == ref.dtype and out.shape == ref.shape, s
        torch.testing.assert_close(out, ref, **_tol(dtype), msg=lambda m: f"{s}: {m}")
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        (g1,) = torch.autograd.grad(out, x1, go)
        (g2,) = torch.autograd.grad(ref, x2, go)
        torch.testing.assert_close(g1, g2, **_tol(dtype), msg=lambda m: f"{s} (grad): {m}")


def test_unsupported_samples_are_clear_errors(opinfo):
    samples = list(opinfo.sample_inputs("cpu", torch.float32, requires_grad=False))
    unsupported = [s for s in samples if not _supported(s)]
    kinds = set()
    for s in unsupported:
        target = s.args[0]
        F.cross_entropy(s.input, target, **s.kwargs)  # PyTorch supports it...
        if s.input.dim() > 2:  # (checked first, whatever the target)
            kinds.add("k-dim")
            match = "K-dimensional input .* is not supported"
        else:
            kinds.add("probabilities")
            match = "class-probability targets are not supported"
        with pytest.raises((ValueError, TypeError), match=match):  # ... we say we do not, and what to do
            LF.cross_entropy(s.input, target, **s.kwargs)
    assert kinds == {"probabilities", "k-dim"}
    # unbatched input (the OpInfo has no such sample): (C,) logits, 0-d target
    x, t = torch.randn(5), torch.tensor(2)
    F.cross_entropy(x, t)
    with pytest.raises(ValueError, match="unbatched input is not supported"):
        LF.cross_entropy(x, t)


x = torch.randn(2, 3)
ERROR_INPUTS = {
    "target out of range": (x, torch.tensor([0, 3]), {}),
    "negative target": (x, torch.tensor([0, -2]), {}),
    "batch size mismatch": (x, torch.tensor([0, 1, 2]), {}),
    "2-D class-index target": (x, torch.zeros(2, 1, dtype=torch.long), {}),
    "float target of another shape": (x, torch.rand(2, 4), {}),
    "weight of the wrong length": (x, torch.tensor([0, 1]), {"weight": torch.ones(4)}),
    "2-D weight": (x, torch.tensor([0, 1]), {"weight": torch.ones(3, 1)}),
    "unknown reduction": (x, torch.tensor([0, 1]), {"reduction": "avg"}),
    "integer input": (torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1]), {}),
    "label_smoothing above 1": (x, torch.tensor([0, 1]), {"label_smoothing": 1.5}),
    "no classes": (torch.randn(2, 0), torch.tensor([0, 0]), {}),
}


@pytest.mark.parametrize("case", sorted(ERROR_INPUTS))
def test_error_inputs_raise_as_pytorch_does(case):
    inp, target, kw = ERROR_INPUTS[case]
    with pytest.raises(Exception) as theirs:
        F.cross_entropy(inp, target, **kw)
    with pytest.raises(theirs.type) as ours:  # catchable as PyTorch's exception class
        LF.cross_entropy(inp, target, **kw)
    assert str(ours.value), "an error without a message"
