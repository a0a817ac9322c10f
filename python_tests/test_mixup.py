"""mixup_loss: the two-target form with one and two cloud draws, fused and reference."""
import pytest
import torch

import ltkernels.losses as L
import ltkernels.reference as R
from ltkernels.mixup import mixup_loss

COUNTS = [200, 90, 40, 20, 9, 4, 2]


def _data(n=12, c=len(COUNTS), dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(n, c, generator=g, dtype=dtype) * 2 - 1).requires_grad_()
    ya = torch.randint(0, c, (n,), generator=g)
    yb = torch.randint(0, c, (n,), generator=g)
    return x, ya, yb


@pytest.mark.parametrize("cls", ["GCLLoss", "GCLAngLoss"])
def test_one_draw_shares_the_noise_two_draws_do_not(cls):
    x, ya, _ = _data()
    crit = getattr(L, cls)(COUNTS, m=0.1, s=20)
    torch.manual_seed(5)
    one = mixup_loss(crit, x, ya, ya, 0.3, draws="one")
    torch.manual_seed(5)
    single = crit(x, ya)  # the same seed draw, offset 0
    torch.testing.assert_close(one, single, rtol=1e-12, atol=1e-12)
    torch.manual_seed(5)
    two = mixup_loss(crit, x, ya, ya, 0.3, draws="two")
    assert not torch.allclose(two, single, rtol=1e-9, atol=1e-9)  # second term saw an independent draw


def test_two_draws_are_reproducible_and_match_two_seeded_calls():
    x, ya, yb = _data()
    crit = L.GCLLoss(COUNTS, m=0.0, s=30, noise_mul=0.5)
    torch.manual_seed(11)
    a = mixup_loss(crit, x, ya, yb, 0.7)
    torch.manual_seed(11)
    b = mixup_loss(crit, x, ya, yb, 0.7)
    assert torch.equal(a, b)
    torch.manual_seed(11)
    from ltkernels.functional import draw_seed
    seed = draw_seed()
    manual = 0.7 * crit(x, ya, seed=seed, offset=0) + 0.3 * crit(x, yb, seed=seed, offset=1)
    torch.testing.assert_close(a, manual, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("draws", ["one", "two"])
def test_injected_noise_fused_equals_reference(draws):
    x, ya, yb = _data()
    noise = torch.randn(x.shape, dtype=x.dtype) / 3
    f = mixup_loss(L.GCLLoss(COUNTS), x, ya, yb, 0.4, draws=draws, noise=noise)
    r = mixup_loss(R.GCLLoss(COUNTS), x, ya, yb, 0.4, draws=draws, noise=noise)
    gf, = torch.autograd.grad(f, x)
    gr, = torch.autograd.grad(r, x)
    torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gf, gr, rtol=1e-10, atol=1e-12)


def test_reference_one_draw_injects_a_single_draw():
    x, ya, _ = _data()
    crit = R.GCLLoss(COUNTS)
    torch.manual_seed(2)
    one = mixup_loss(crit, x, ya, ya, 0.25, draws="one")
    torch.manual_seed(2)
    single = crit(x, ya)
    torch.testing.assert_close(one, single, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls,args", [("LDAMLoss", (COUNTS,)), ("CrossEntropyLoss", ()), ("KPSLoss", (COUNTS,))])
def test_plain_losses(cls, args):
    x, ya, yb = _data()
    f = mixup_loss(getattr(L, cls)(*args), x, ya, yb, 0.6)
    ref = 0.6 * getattr(R, cls)(*args)(x, ya) + 0.4 * getattr(R, cls)(*args)(x, yb)
    torch.testing.assert_close(f, ref, rtol=1e-10, atol=1e-12)


def test_bad_arguments():
    x, ya, yb = _data()
    with pytest.raises(ValueError, match="draws"):
        mixup_loss(L.GCLLoss(COUNTS), x, ya, yb, 0.5, draws="three")
    with pytest.raises(ValueError, match="lam"):
        mixup_loss(L.GCLLoss(COUNTS), x, ya, yb, 1.5)
