"""What a fused loss step asks of the device: the ATen / ltkernels ops its forward and backward issue.

The host code of margin_ce is the same on CPU and CUDA (csrc/margin_ce_common.h's run_margin_ce), so the ops
a CPU step dispatches are the ops a CUDA step would: a CUDA step launches, per op, the kernels of
cuda/margin_ce_kernels.cuh (margin_ce: a prologue and the row kernel; the emulator tests count those
launches) and cuda/margin_ce_grad_scale.cuh (one). The bar (issue: "<= 3 device kernels per forward+backward,
0 host syncs"): one ltkernels::margin_ce in the forward, one ltkernels::margin_ce_grad_scale_ in the backward,
no other computing op (allocations and no-op conversions only) and nothing that reads a device value on the
host. So a CUDA step is 3 kernels of ours; ``loss.backward()`` adds the autograd engine's own
``ones_like`` fill of the seed gradient (not counted: any loss has it), and the scale kernel then exits at once
(grad_output == 1, read on the device).
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import ltkernels
from ltkernels import losses

# ops that only allocate or describe memory: no kernel on a device (a real conversion shows up as the
# aten::_to_copy / aten::copy_ inside an aten::to, which count)
ALLOCATION = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resize_", "aten::as_strided",
              "aten::view", "aten::reshape", "aten::detach", "aten::alias", "aten::unsqueeze", "aten::lift_fresh",
              "aten::to", "aten::contiguous"}
# subtrees that are not the loss's: the engine's seed gradient, the backward of a `* 3` applied outside the
# loss, the gradient accumulation into .grad, and the CPU implementation of the in-place scale (one kernel on
# CUDA: cuda/margin_ce_grad_scale.cuh)
SYNCS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal"}

CASES = {
    "LDAM-DRW": lambda cls: losses.LDAMLoss(cls, s=30.0, weight=torch.rand(len(cls)) + 0.5),
    "GCL": lambda cls: losses.GCLLoss(cls),
    "KPS": lambda cls: losses.KPSLoss(cls),
    "CE-smoothing": lambda cls: losses.CrossEntropyLoss(label_smoothing=0.1),
}
# On the CPU the cloud's Philox seed is drawn from torch's CPU generator (one host op, functional.draw_seed);
# on CUDA the kernel takes the CUDA generator's state instead and the op is not issued.
HOST_ONLY = {"aten::randint"}
NOT_THE_LOSS = {"aten::ones_like", "MulBackward0", "torch::autograd::AccumulateGrad", "ltkernels::margin_ce_grad_scale_"}
NOT_THE_LOSS |= HOST_ONLY


def _ops_of(fn) -> list[str]:
    """The computing ops `fn` dispatches, at any depth, outside the NOT_THE_LOSS subtrees (their roots kept)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def excluded(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name in NOT_THE_LOSS:
                return True
            p = p.cpu_parent
        return False

    # (an op's autograd kernel redispatching to its device kernel is recorded twice, nested: count it once)
    return [e.name for e in prof.events() if e.name.startswith(("aten::", "ltkernels::")) and not excluded(e)
            and not (e.cpu_parent is not None and e.cpu_parent.name == e.name)
            and e.name not in ALLOCATION and e.name not in NOT_THE_LOSS - {"ltkernels::margin_ce_grad_scale_"}]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and torch.ops.ltkernels.margin_ce.default.has_kernel_for_dispatch_key("CUDA") else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("scaled", [False, True], ids=["backward", "scaled_backward"])
def test_fused_step_issues_one_op_each_way(case, scaled, device):
    cls = [100, 50, 20, 10, 5, 2]
    crit = CASES[case](cls).to(device)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, len(cls), generator=g) * 0.3).clamp(-1, 1).to(device).requires_grad_()
    t = torch.randint(0, len(cls), (16,), generator=g).to(device)
    crit(x, t).backward()  # warm-up (lazy registrations, caches)
    x.grad = None

    def fwd():
        return crit(x, t)

    fwd_ops = _ops_of(fwd)
    x.grad = None
    loss = crit(x, t)
    if scaled:  # loss * 3: the backward gets grad_output 3, scaled on the device
        loss = loss * 3.0

    def bwd():
        loss.backward()

    bwd_ops = _ops_of(bwd)
    assert [o for o in fwd_ops if o != "ltkernels::cross_entropy"] == ["ltkernels::margin_ce"], (
        f"{case}: the forward issues more than the fused op: {fwd_ops}")
    # on the CPU a plain loss.backward() reads grad_output = 1 on the host and returns the saved gradient as
    # it is (no op); on CUDA (and for any other grad_output) the one in-place scale op
    want = [] if (x.device.type == "cpu" and not scaled) else ["ltkernels::margin_ce_grad_scale_"]
    assert bwd_ops == want, f"{case}: backward ops {bwd_ops}"
    assert not SYNCS & set(fwd_ops + bwd_ops), (fwd_ops, bwd_ops)


def test_in_place_scale_leaves_a_held_gradient_alone():
    """A caller that keeps the op's grad output sees it unchanged after a scaled backward: the backward then
    multiplies out of place."""
    x = torch.randn(5, 7, requires_grad=True)
    t = torch.randint(0, 7, (5,))
    a = ltkernels._ops.margin_ce_arguments((x, t), {"compute_grad": True})
    loss, grad, _ = torch.ops.ltkernels.margin_ce(*a.values())
    held = grad.clone()
    (loss * 2.0).backward()
    torch.testing.assert_close(grad, held, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, 2.0 * held)


def test_retained_graph_backward_twice():
    """retain_graph keeps the saved gradient for a second backward: no in-place scale then."""
    x = torch.randn(6, 9, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    loss = ltkernels.functional.margin_cross_entropy(x, t, scale=2.0) * 3.0
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)
    x2 = x.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(2.0 * x2, t) * 3.0
    ref.backward()
    torch.testing.assert_close(first, x2.grad, rtol=1e-5, atol=1e-6)
