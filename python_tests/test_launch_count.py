"""What a fused loss step and a cosine-head step ask of the device: the ATen / ltkernels ops (and, for the
head, the device primitives) their forward and backward issue.

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


# ==== the cosine head =====================================================================================
# The head's host code (csrc/cosine_head_common.cpp) is the same on CPU and CUDA too; between its GEMMs
# (aten::mm: one cuBLAS kernel each) it calls device primitives, each recorded for the profiler under the
# name below (csrc/cosine_head_op.h). HEAD_KERNELS: the CUDA kernels each primitive launches
# (csrc/cuda/cosine_head_cuda.cu; test_cuda_kernels_per_head_primitive counts them on the emulator).
HEAD_KERNELS = {
    "ltk_device::cosine_norms": 1,
    "ltk_device::cosine_norms_pair": 1,  # both operands' norms
    "ltk_device::cosine_scale": 1,
    "ltk_device::cosine_scale_dots": 1,  # G / |x| / |w| and the tangent dot products, as per-tile parts
    "ltk_device::cosine_tangent_rows": 1,
    "ltk_device::cosine_tangent_cols": 2,  # a column-dot kernel, then the update
    "ltk_device::cosine_tangent_cols_dots": 1,
}
GEMMS = {"aten::mm"}
# views and allocations the head's host code makes (no kernel)
HEAD_NO_KERNEL = ALLOCATION | {"aten::t", "aten::transpose", "aten::_reshape_alias", "aten::expand",
                               "aten::numpy_T", "aten::permute", "aten::resolve_conj", "aten::resolve_neg"}


def _head_steps(fn) -> list[str]:
    """The device primitives and the other ATen ops `fn` runs, outside the primitives' own subtrees (a
    back end's internals: on CUDA its kernels, counted by HEAD_KERNELS)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def inside_primitive(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("ltk_device::"):
                return True
            p = p.cpu_parent
        return False

    return [e.name for e in prof.events() if not inside_primitive(e) and (
        e.name.startswith("ltk_device::") or (e.name.startswith("aten::") and e.name not in HEAD_NO_KERNEL
                                              and not (e.cpu_parent is not None and e.cpu_parent.name == e.name)))]


def _kernels(steps: list[str]) -> int:
    unknown = [s for s in steps if s not in HEAD_KERNELS and s not in GEMMS]
    assert not unknown, f"ops other than the primitives and the GEMMs: {unknown}"
    return sum(HEAD_KERNELS.get(s, 1) for s in steps)


# (layout, N, D, C, dtype) -> CUDA kernels of one forward + backward (the bar: norms once, in one launch;
# the backward's dot products from the logits in the same pass as the gradient's scaling)
HEAD_CASES = {
    # logits kept (N <= D): norms_pair, GEMM, scale | scale_dots, 2 GEMMs, 2 tangents
    ("in_out", 8, 16, 12, torch.float32): 3 + 5,
    ("out_in", 8, 16, 12, torch.float32): 3 + 5,  # (C, D) weight: both tangents are row kernels
    ("in_out", 8, 16, 12, torch.bfloat16): 3 + 5,
    # N > D: no logits kept; the column tangent computes its dot products (2 kernels)
    ("in_out", 40, 16, 12, torch.float32): 3 + 6,
    ("out_in", 40, 16, 12, torch.float32): 3 + 5,
    # float16 normalises the operands first (no raw dot product may overflow): 2 scales more each way
    ("in_out", 8, 16, 12, torch.float16): 4 + 7,
}


HEAD_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and
                           torch.ops.ltkernels.cosine_logits.default.has_kernel_for_dispatch_key("CUDA") else [])


@pytest.mark.parametrize("device", HEAD_DEVICES)
@pytest.mark.parametrize("case", list(HEAD_CASES), ids=str)
def test_cosine_head_step_kernels(case, device):
    layout, n, d, c, dtype = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(dtype).to(device).requires_grad_()
    w0 = torch.randn(d, c, generator=g).to(dtype).to(device)
    w = (w0 if layout == "in_out" else w0.t().contiguous()).requires_grad_()
    grad = torch.randn(n, c, generator=g).to(dtype).to(device)

    def step():
        out = ltkernels.cosine_logits(x, w if layout == "in_out" else w.t())
        out.backward(grad)

    step()  # warm-up
    x.grad = w.grad = None
    steps = _head_steps(step)
    assert not SYNCS & set(steps), steps
    assert steps.count("aten::mm") == 3, steps
    assert _kernels(steps) == HEAD_CASES[case], steps


def test_head_kernel_count_can_fail():
    """The counter sees a primitive more: two separate norms calls instead of the pair."""
    x, w = torch.randn(4, 6), torch.randn(6, 5)

    def two_norms():
        torch.ops.ltkernels.cosine_norms(x, 1)
        torch.ops.ltkernels.cosine_norms(w, 0)

    assert _head_steps(two_norms) == ["ltk_device::cosine_norms"] * 2
    with pytest.raises(AssertionError, match="ops other than"):
        _kernels(_head_steps(lambda: torch.softmax(x, 1)))


@pytest.fixture
def emu_lib():
    import emu

    lib = emu.lib()
    emu.set_options(seed=1, schedule="random", timeout_s=60.0, sm_count=4, poison=True, shuffle_blocks=True,
                    clamp_grid=0)
    return emu, lib


def test_cuda_kernels_per_head_primitive(emu_lib):
    """Each primitive's CUDA launch function (the ones csrc/cuda/cosine_head_cuda.cu calls), run on the
    emulator, launches HEAD_KERNELS[primitive] kernels."""
    import ctypes

    emu, L = emu_lib
    r, c = 40, 300
    m = emu.guarded(torch.randn(r, c, dtype=torch.float64))
    g = emu.guarded(torch.randn(r, c, dtype=torch.float64))
    out = emu.guarded(torch.empty(r, c, dtype=torch.float64))
    vr, vc = emu.guarded(torch.rand(r, dtype=torch.float64) + 1), emu.guarded(torch.rand(c, dtype=torch.float64) + 1)
    parts_r = emu.guarded(torch.empty(2, r, dtype=torch.float64))
    parts_c = emu.guarded(torch.empty(2, c, dtype=torch.float64))
    ws = emu.guarded(torch.empty(c, dtype=torch.float64))
    p, ll, eps = emu.ptr, ctypes.c_longlong, ctypes.c_double(1e-12)
    calls = {
        "ltk_device::cosine_norms": ("norms", ll(r), ll(c), p(m), 0, p(vc)),
        "ltk_device::cosine_norms_pair": ("norms_pair", ll(r), ll(c), p(m), 1, p(vr), ll(r), ll(c), p(g), 0, p(vc)),
        "ltk_device::cosine_scale": ("scale", ll(r), ll(c), p(m), ll(c), ll(1), p(vr), p(vc), eps, p(out)),
        "ltk_device::cosine_scale_dots": ("scale_dots", ll(r), ll(c), p(m), p(g), p(vr), p(vc), eps, p(out), p(parts_r),
                                          p(parts_c)),
        "ltk_device::cosine_tangent_rows": ("tangent", ll(r), ll(c), p(out), p(m), 1, p(vr), eps, 1, p(None), p(None)),
        "ltk_device::cosine_tangent_cols": ("tangent", ll(r), ll(c), p(out), p(m), 0, p(vc), eps, 1, p(None), p(ws)),
        "ltk_device::cosine_tangent_cols_dots": ("tangent_dots", ll(r), ll(c), p(out), p(m), 0, p(vc), p(parts_c),
                                                 ll(2), eps, 1, p(None)),
    }
    assert set(calls) == set(HEAD_KERNELS)
    for name, (fn, *args) in calls.items():
        emu.clear_launches()
        L.call(f"ltk_emu_cosine_{fn}_f64", *args)
        assert len(emu.launches()) == HEAD_KERNELS[name], (name, emu.launches())
