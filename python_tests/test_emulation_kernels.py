"""The project's CUDA kernels (csrc/cuda/*.cuh) run on the CPU through the SIMT emulator (csrc/emu) and
are compared with the CPU ops (torch.ops.ltkernels.*, bit-identical Philox noise included) and with the
eager references, on the edge shapes: C = 1, C not a multiple of the block, C larger than one block's
stride, N = 0, N = 1; every reduction mode; every dtype the kernel supports.

Buffers handed to the kernels are "guarded" (emu.guarded: an inaccessible page right after the last
byte), outputs are pre-filled with NaN (an element the kernel forgets to write shows up), and the
thread order is a seeded random schedule (LTK_EMU_SEED picks another one).

With a GPU (torch.cuda.is_available()) the same cases also run through the real CUDA ops (`-k cuda`).
Every __global__ kernel in csrc/cuda/*.cuh must be listed in KERNEL_COVERAGE (see
test_every_cuda_kernel_is_emulated). docs/emulator.md describes the emulator and its limits.
"""
from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import emu
from emu import EmulatorError, guarded, ptr

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
HAS_CUDA = torch.cuda.is_available()

ops = None
_ops = None
try:  # the compiled extension: CPU oracle (and CUDA ops on a GPU machine)
    from ltkernels import _ops
    from ltkernels import reference

    ops = torch.ops.ltkernels
except Exception as e:  # pragma: no cover - only when the extension is not built
    _OPS_ERROR = repr(e)

needs_ops = pytest.mark.skipif(ops is None, reason="ltkernels._C not built (tools/build.sh)")

# Every __global__ kernel of csrc/cuda/*.cuh -> the test in this module that runs it through the emulator.
KERNEL_COVERAGE = {
    "margin_ce_kernel": "test_margin_ce_shapes_dtypes",
    "margin_ce_prologue_kernel": "test_margin_ce_shapes_dtypes",
    "margin_ce_stream_kernel": "test_margin_ce_stream_edge_shapes",
    "margin_ce_grad_scale_kernel": "test_margin_ce_grad_scale",
    "vec_dots_kernel": "test_cosine_vec_dot",  # and test_cosine_norms_pair
    "scale_kernel": "test_cosine_scale",
    "row_tangent_kernel": "test_cosine_tangent",
    "col_tangent_kernel": "test_cosine_tangent",
    "scale_dots_kernel": "test_cosine_scale_dots",
    "pair_transform_kernel": "test_uniformity_pair_transform",  # uniformity (ltkernels.regularisers)
    "exp_shift_kernel": "test_uniformity_exp_shift",
}

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SEEDS = [int(os.environ.get("LTK_EMU_SEED", "0x5EED"), 0), 1, 2]


@pytest.fixture(scope="module")
def L():
    return emu.lib()


@pytest.fixture(autouse=True)
def _default_options(L):
    emu.set_options(seed=SEEDS[0], schedule="random", timeout_s=60.0, sm_count=4, poison=True,
                    shuffle_blocks=True, clamp_grid=0)
    yield
    emu.set_options(clamp_grid=0)  # process-wide: must not leak into the next test module


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tol(dtype):
    return {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6),
            torch.float16: dict(rtol=2e-3, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-4)}[dtype]


# ==== margin_ce ===========================================================================================
# the op's codes and vector arguments, as the extension exports them (csrc/include/ltk/margin_ce*.h)
REDUCTIONS = dict(_ops.REDUCTIONS) if _ops else {}
ANGULAR = dict(_ops.ANGULAR) if _ops else {}
VECTORS = dict(_ops.MARGIN_CE_VECTORS) if _ops else {}
_FLAT_CTYPES = {"ptr": ctypes.c_void_p, "f64": ctypes.c_double, "u64": ctypes.c_uint64, "i64": ctypes.c_int64}
_FLAT_TYPES = {}


def margin_ce_flat_type(L):
    """The ctypes mirror of FlatMarginCe (python_tests/emu/margin_ce.cpp), from the fields the library lists."""
    if L.path not in _FLAT_TYPES:
        L.cdll.ltk_emu_margin_ce_layout.restype = ctypes.c_char_p
        layout = L.cdll.ltk_emu_margin_ce_layout().decode().strip(",").split(",")
        fields = [(name, _FLAT_CTYPES[ctype]) for name, ctype in (f.split(":") for f in layout)]
        _FLAT_TYPES[L.path] = type("MarginCeFlat", (ctypes.Structure,), {"_fields_": fields})
    return _FLAT_TYPES[L.path]


def flat_margin_ce(L, x, t, kw, p, P, outputs):
    """The FlatMarginCe of one call: the inputs through P(tensor or None, name) -> address, the prepared
    values p (_prepare), the output and device-scalar addresses ``outputs`` (a dict by field name)."""
    N, C = x.shape
    f = margin_ce_flat_type(L)()
    f.input, f.target = P(x, "input"), P(t, "target")
    for k in (*VECTORS, "noise"):
        setattr(f, k, P(p[k], k))
    for k, v in outputs.items():
        setattr(f, k, v)
    f.scale, f.noise_mul, f.angular_eps = kw["scale"], kw["noise_mul"], kw["angular_eps"]
    f.gamma, f.smoothing = kw["gamma"], kw["label_smoothing"]
    f.seed, f.offset = p["seed"], kw["offset"]
    f.angular, f.focal, f.ignore_index, f.reduction, f.N, f.C = (
        kw["angular"], kw["focal"], kw["ignore_index"], kw["reduction"], N, C)
    return f


def margin_ce_case(N, C, dtype, *, seed=0, features=(), angular="linear", ignore=False, weight=False):
    """Inputs and keyword arguments (op-level) for one margin_ce call."""
    g = torch.Generator().manual_seed(1000 * N + C + seed)
    acc = torch.float64
    if angular == "linear":
        x = torch.randn(N, C, generator=g, dtype=torch.float64) * 2
    else:
        x = torch.rand(N, C, generator=g, dtype=torch.float64) * 2 - 1
    if "bounds" in features:  # cosines at and beyond +-1 (ArcFace's clamp: no gradient there)
        x = x * 1.25
        x.view(-1)[::7] = 1.0
        x.view(-1)[3::11] = -1.0
    x = x.to(dtype)
    t = torch.randint(0, C, (N,), generator=g) if C > 0 else torch.zeros(N, dtype=torch.int64)
    if ignore and N > 1:
        t[::3] = -100
    kw = {k: v for k, v in _ops.MARGIN_CE_DEFAULTS.items() if k != "compute_grad"}  # the schema's defaults
    kw.update(noise_mul=0.0, angular=ANGULAR[angular])
    vec = lambda lo, hi: (torch.rand(C, generator=g, dtype=acc) * (hi - lo) + lo)  # noqa: E731
    if "scale" in features:
        kw["scale"] = 7.5
    if "col_scale" in features:
        kw["col_scale"] = vec(0.8, 1.6)
    if "col_bias" in features:
        kw["col_bias"] = vec(-1, 1)
    if "margin" in features:
        kw["margin"] = vec(0, 0.5)
    if "target_scale" in features:
        kw["target_scale"] = vec(10, 30)
    if weight or "weight" in features:
        kw["weight"] = vec(0.2, 3)
    if "shift" in features:
        kw["row_shift"] = torch.rand(N, generator=g, dtype=acc) * 3
        kw["shift_coef"] = vec(-1, 0)
    if "cloud_noise" in features:
        kw["cloud"] = vec(0, 1)
        kw["noise"] = torch.randn(N, C, generator=g, dtype=acc) / 3
        kw["noise_mul"] = 0.5
    if "cloud_philox" in features:
        kw["cloud"] = vec(0, 1)
        kw["seed"] = torch.tensor([123456789 + seed], dtype=torch.int64)
        kw["offset"] = 17
        kw["noise_mul"] = 1.0
    if angular.startswith("gclang"):
        kw["angular_eps"] = 0.1
        if kw["cloud"] is None:
            kw["cloud"] = vec(0, 1)
            kw["noise"] = torch.randn(N, C, generator=g, dtype=acc) / 3
    return x, t, kw


def _prepare(x, t, kw):
    """What margin_ce_common.cpp's prepare_margin_ce does for a device: vectors in the accumulation dtype
    and the seed (the kernels' prologue computes the reduction's denominator and the weight sum)."""
    acc = _acc(x.dtype)
    p = {k: (kw[k].to(acc).contiguous() if kw[k] is not None else None) for k in (*VECTORS, "noise")}
    p["seed"] = int(kw["seed"].item()) if kw["seed"] is not None else 0
    return p


# cuda/margin_ce_stream.cuh's StreamPath values
STREAM_PATHS = {0: "generic", 1: "warp_cached", 2: "block_cached", 3: "block_streaming"}


def emu_margin_ce(L, x, t, kw, compute_grad=True, guard=True, philox_ptrs=None, plan=None, offsets=(0, 0)):
    """The emulated CUDA forward (prologue + row kernel, which reduces): (loss, grad, grad_row_shift,
    row_loss). An empty batch is the host's (margin_ce_common.h's run_margin_ce), which launches nothing.
    philox_ptrs: (seed, offset, offset_intragraph) read by the kernel from device memory, as under CUDA
    graph capture. plan: a dict that receives the launch plan as launch_margin_ce decides it: the row
    kernel, its path (STREAM_PATHS), threads per block and dynamic shared memory bytes. offsets: (input, grad) start offsets in elements
    into their buffers (a view into a larger tensor: rows with another alignment)."""
    N, C = x.shape
    acc = _acc(x.dtype)
    p = _prepare(x, t, kw)
    G = guarded if guard else (lambda v, **k: v.clone())
    keep = []
    none = kw["reduction"] == 0

    def P(v, name=None):
        if v is None:
            return None
        v = G(v.contiguous(), name=name)
        keep.append(v)
        return v.data_ptr()

    pads = []

    def shifted(v, k, name):
        """v as a view starting k elements past a 16-byte boundary. Guarded buffers end at a page, so their
        start's alignment is set by their size: q trailing padding elements (NaN, checked untouched
        afterwards) set it; q = 0 leaves the view against the guard page."""
        es = v.element_size()
        q = next(q for q in range(16) if (-(q + v.numel()) * es) % 16 == (k * es) % 16)
        buf = G(torch.cat([v.reshape(-1), torch.full((q,), float("nan"), dtype=v.dtype)]), name=name,
                init=None if bool(v.isnan().all()) else True)
        keep.append(buf)
        pads.append(buf[v.numel():])
        out = buf[:v.numel()].view(v.shape)
        assert not guard or out.data_ptr() % 16 == (k * es) % 16
        return out

    row_loss = G(torch.full((N,), float("nan"), dtype=acc))
    grad = shifted(torch.full((N, C), float("nan"), dtype=x.dtype), offsets[1], "grad") if compute_grad else None
    gshift = G(torch.full((N,), float("nan"), dtype=acc)) if (compute_grad and p["row_shift"] is not None) else None
    loss_out = G(torch.full((N,) if none else (1,), float("nan"), dtype=x.dtype))
    nbytes = L.ltk_emu_margin_ce_scalars_bytes(DTYPE_CODE[x.dtype])
    scalars = G(torch.zeros(nbytes, dtype=torch.uint8), init=False)
    outputs = dict(row_loss=row_loss.data_ptr(), grad=grad.data_ptr() if grad is not None else None,
                   grad_row_shift=gshift.data_ptr() if gshift is not None else None,
                   loss_out=loss_out.data_ptr(), scalars=scalars.data_ptr())
    if philox_ptrs is not None:
        s_, o_, intra = philox_ptrs
        outputs["seed_ptr"] = P(torch.tensor([s_], dtype=torch.int64))
        outputs["offset_ptr"] = P(torch.tensor([o_], dtype=torch.int64))
        outputs["offset_intragraph"] = intra
    f = flat_margin_ce(L, x, t, kw, p, P, outputs)
    xs = shifted(x.contiguous(), offsets[0], "input")
    f.input = xs.data_ptr()
    if plan is not None:
        path, blocks, threads, smem = ctypes.c_int(), ctypes.c_longlong(), ctypes.c_int(), ctypes.c_longlong()
        L.call("ltk_emu_margin_ce_plan", DTYPE_CODE[x.dtype], ctypes.byref(f), ctypes.byref(path), ctypes.byref(blocks),
               ctypes.byref(threads), ctypes.byref(smem))
        plan.update(kernel="margin_ce_stream_kernel" if path.value else "margin_ce_kernel", path=STREAM_PATHS[path.value],
                    blocks=blocks.value, threads=threads.value, smem=smem.value)
    L.call("ltk_emu_margin_ce", DTYPE_CODE[x.dtype], ctypes.byref(f))
    assert all(bool(pad.isnan().all()) for pad in pads), "the kernel wrote past the end of a buffer"
    if N == 0:
        loss = torch.empty(0, dtype=x.dtype) if none else torch.tensor(0.0 if kw["reduction"] == 1 else float("nan"),
                                                                       dtype=x.dtype)
    else:
        loss = loss_out.clone() if none else loss_out.reshape(()).clone()
    return loss, grad, gshift, row_loss


def op_margin_ce(x, t, kw, device="cpu", compute_grad=True):
    d = lambda v: v.to(device) if isinstance(v, torch.Tensor) and v is not kw.get("seed") else v  # noqa: E731
    a = {k: d(v) for k, v in kw.items()}
    args = _ops.margin_ce_arguments((d(x), d(t)), dict(a, compute_grad=compute_grad))
    loss, grad, gshift = ops.margin_ce(*args.values())
    return loss.cpu(), grad.cpu(), gshift.cpu()


def _check_vs_op(L, x, t, kw, device="cpu", plan=None, offsets=(0, 0)):
    loss, grad, gshift, row_loss = emu_margin_ce(L, x, t, kw, plan=plan, offsets=offsets)
    r_loss, r_grad, r_gshift = op_margin_ce(x, t, kw, device=device)
    tol = _tol(x.dtype)
    torch.testing.assert_close(loss, r_loss, **tol, equal_nan=True)
    torch.testing.assert_close(grad, r_grad, **tol, equal_nan=True)
    if gshift is not None:
        torch.testing.assert_close(gshift, r_gshift, **_tol(_acc(x.dtype)))
    return loss, grad


SHAPES = [(1, 1), (3, 1), (1, 7), (4, 33), (5, 128), (3, 255), (2, 1021), (2, 1030), (2, 2500)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@needs_ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,C", SHAPES)
def test_margin_ce_shapes_dtypes(L, N, C, dtype):
    """C = 1, C not a multiple of 4 / 32 / the block, C beyond one block's stride (256 threads x 4
    columns = 1024), N = 1; class scale + margin + weights, weighted mean."""
    x, t, kw = margin_ce_case(N, C, dtype, features=("scale", "col_scale", "margin", "weight"))
    emu.clear_launches()
    plan = {}
    _check_vs_op(L, x, t, kw, plan=plan)
    pro, rec = emu.launches()  # the prologue (scalars), then the rows
    assert "margin_ce_prologue_kernel" in pro["kernel"] and pro["grid"] == (1, 1, 1)
    # fp32 / fp16 / bf16 run the stream kernel for these features; fp64 the generic one
    assert plan["kernel"] == ("margin_ce_kernel" if dtype == torch.float64 else "margin_ce_stream_kernel")
    assert f"::{plan['kernel']}<" in rec["kernel"]
    assert rec["grid"] == (plan["blocks"], 1, 1) and rec["block"] == (plan["threads"], 1, 1)
    assert rec["smem"] == plan["smem"]
    if plan["kernel"] == "margin_ce_stream_kernel":  # one warp per row up to 1024 columns, cached up to 48 KiB
        assert plan["path"] == ("warp_cached" if C <= 1024 else "block_cached" if C <= 12288 else "block_streaming")


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_margin_ce_empty_batch(L, dtype):
    x, t, kw = margin_ce_case(0, 5, dtype)
    for red in REDUCTIONS.values():
        kw["reduction"] = red
        emu.clear_launches()
        loss, grad, _, _ = emu_margin_ce(L, x, t, kw)
        assert emu.launches() == [], "N = 0 must not launch (a grid of 0 blocks is invalid on a GPU)"
        r_loss, r_grad, _ = op_margin_ce(x, t, kw)
        torch.testing.assert_close(loss, r_loss, equal_nan=True)
        assert grad.shape == r_grad.shape == (0, 5)


MODES = {
    "none": dict(reduction=0),
    "sum": dict(reduction=1),
    "mean": dict(reduction=2),
    "batch_mean": dict(reduction=3),
    "weighted_mean": dict(reduction=2, weight=True),
    "weighted_batch_mean": dict(reduction=3, weight=True),
    "focal_detached": dict(reduction=3, focal=1, gamma=1.0),
    "focal_full": dict(reduction=3, focal=2, gamma=2.0, weight=True),
    "focal_none_gamma0": dict(reduction=0, focal=1, gamma=0.0),
    "smoothing": dict(reduction=2, label_smoothing=0.1),
    "smoothing_weighted": dict(reduction=2, label_smoothing=0.2, weight=True),
    "ignore_mean": dict(reduction=2, ignore=True),
    "ignore_weighted_none": dict(reduction=0, ignore=True, weight=True),
    "ignore_other_index": dict(reduction=1, ignore=True, ignore_index=3),
}


@needs_ops
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,C", [(1, 1), (6, 37), (5, 1100)])
def test_margin_ce_reductions(L, mode, dtype, N, C):
    m = dict(MODES[mode])
    x, t, kw = margin_ce_case(N, C, dtype, features=("scale", "margin"), ignore=m.pop("ignore", False),
                              weight=m.pop("weight", False))
    if m.get("ignore_index") == 3:
        t[t == -100] = 3 if C > 3 else 0
        m["ignore_index"] = 3 if C > 3 else 0
    kw.update(m)
    _check_vs_op(L, x, t, kw)


FEATURES = {
    "col_bias": ("col_bias",),
    "target_scale": ("target_scale", "margin"),
    "row_shift": ("shift", "col_scale"),
    "cloud_injected_noise": ("cloud_noise", "scale", "margin"),
    "cloud_philox": ("cloud_philox", "scale", "margin"),
    "everything": ("col_scale", "col_bias", "margin", "target_scale", "weight", "shift", "cloud_philox"),
}


@needs_ops
@pytest.mark.parametrize("feat", sorted(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,C", [(1, 1), (4, 33), (3, 1030)])
def test_margin_ce_features(L, feat, dtype, N, C):
    x, t, kw = margin_ce_case(N, C, dtype, features=FEATURES[feat])
    _check_vs_op(L, x, t, kw)


# One case per instantiation of the stream kernel (its kFeat, cuda/margin_ce_stream.cuh), with the per-row
# options (margin, target scale, weights, focal) spread over them.
STREAM_FEATURES = {
    0: (("scale", "margin", "weight"), dict(reduction=2)),
    1: (("col_scale", "target_scale", "margin"), dict(reduction=0)),
    2: (("col_bias", "margin"), dict(reduction=3, focal=1, gamma=2.0)),
    3: (("col_scale", "col_bias", "weight"), dict(reduction=1, focal=2, gamma=1.5)),
    4: (("shift", "scale", "weight"), dict(reduction=2)),
    8: (("cloud_philox", "scale", "margin"), dict(reduction=2)),
    10: (("cloud_philox", "col_bias", "margin"), dict(reduction=0)),
    16: (("scale", "margin", "weight", "bounds"), dict(reduction=3, angular="arcface")),
    32: (("scale", "margin", "target_scale"), dict(reduction=2, label_smoothing=0.1)),
    96: (("margin", "weight"), dict(reduction=0, label_smoothing=0.3)),
}


@needs_ops
@pytest.mark.parametrize("feat", sorted(STREAM_FEATURES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,C", [(1, 1), (3, 7), (9, 100), (4, 1030), (3, 2500), (2, 12301)])
@pytest.mark.parametrize("offsets", [(0, 0), (1, 1), (2, 0)], ids=["aligned", "offset1", "input_only"])
def test_margin_ce_stream_edge_shapes(L, feat, dtype, N, C, offsets):
    """The stream kernels, every instantiation and path: C = 1, C % 4 != 0, one warp per row with a last
    block only partly used (9 rows, 8 per block), C spanning several block strides (256 threads x 4 or 8
    columns), the streaming path beyond the 48 KiB logit cache, N = 1, ignore_index rows, and rows that are
    not 16-byte aligned (the input and the gradient offset by one element: 4- or 2-byte pieces; fp32 input
    two elements off: 8-byte pieces, the (N, 8142) case; an input aligned unlike the gradient, which fp16 /
    bf16 send to the generic kernel unless the cloud is on)."""
    features, extra = STREAM_FEATURES[feat]
    extra = dict(extra)
    x, t, kw = margin_ce_case(N, C, dtype, features=features, ignore=True, angular=extra.pop("angular", "linear"))
    kw.update(extra)
    plan = {}
    emu.clear_launches()
    _check_vs_op(L, x, t, kw, plan=plan, offsets=offsets)
    rel = (offsets[0] - offsets[1]) * x.element_size() % 16  # input vs gradient offset, bytes mod 16
    if x.element_size() == 2 and not feat & 8 and rel:
        # 2-byte types without the cloud have no narrow paths (kNarrowPaths): the generic kernel runs
        assert plan["kernel"] == "margin_ce_kernel"
        return
    assert plan["kernel"] == "margin_ce_stream_kernel"
    assert plan["path"] == ("warp_cached" if C <= 1024 else "block_cached" if C <= 12288 else "block_streaming")
    rec = emu.launches()[-1]
    assert f"margin_ce_stream_kernel<{feat}," in rec["kernel"]


@needs_ops
@pytest.mark.parametrize("angular", ["arcface", "arcface_easy"])
@pytest.mark.parametrize("mode", ["mean", "focal_full", "ignore_weighted_none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,C", [(3, 7), (9, 100), (3, 2500)])
def test_margin_ce_stream_arcface(L, angular, mode, dtype, N, C):
    """ArcFace and its easy-margin variant in the stream kernel (kFeatArcFace): cosines clamped to [-1, 1]
    with no gradient at or beyond the bounds, the target's S cos(theta + m) and its derivative kept by the
    lane that owns the target's chunk through pass 2; with and without a target scale. (A class scale, bias
    or row shift with an angular mode is refused by the op: test_margin_ce.py.)"""
    m = dict(MODES[mode])
    feats = ("scale", "margin", "bounds") + (("target_scale",) if C == 100 else ())
    x, t, kw = margin_ce_case(N, C, dtype, features=feats, angular=angular, ignore=m.pop("ignore", False),
                              weight=m.pop("weight", False))
    kw.update(m)
    plan = {}
    _check_vs_op(L, x, t, kw, plan=plan)
    assert plan["kernel"] == "margin_ce_stream_kernel"


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_margin_ce_stream_loads_16_bytes_on_aligned_rows(L, dtype):
    """The memory model sees the widths the stream kernel moves: 16-byte input loads and gradient stores on
    aligned rows and on rows 2 elements off (their chunks start at the first 16-byte boundary); with the
    cloud (whose chunks start at column 0) rows 2 elements off move in 8-byte (fp32: the (N, 8142) layout) or
    4-byte (bf16) pieces."""
    N, C = 1, 8142 if dtype == torch.float32 else 8144  # one row: its alignment is the offset's
    widths = {}
    for off, cloud in ((0, False), (2, False), (0, True), (2, True)):
        x, t, kw = margin_ce_case(N, C, dtype, features=("scale", "margin") + (("cloud_philox",) if cloud else ()))
        emu.model_launches()
        with emu.options(model=True):
            emu_margin_ce(L, x, t, kw, offsets=(off, off))
        rec = emu.model_launches()[-1]
        widths[off, cloud] = {op: max(s["width"] for s in rec["sites"] if s["region"] == region and s["op"] == op)
                              for region, op in (("input", "read"), ("grad", "write"))}
    v16 = {"read": 16, "write": 16}
    assert widths[0, False] == widths[2, False] == widths[0, True] == v16, widths
    assert widths[2, True] == ({"read": 8, "write": 8} if dtype == torch.float32 else {"read": 4, "write": 4}), widths


@needs_ops
def test_margin_ce_stream_philox_from_device_pointers(L):
    """Under CUDA graph capture the kernel reads the Philox seed and offset from device memory (plus the
    intra-graph offset): the same draw as the values passed directly, another offset another draw."""
    x, t, kw = margin_ce_case(3, 70, torch.float32, features=("cloud_philox", "scale", "margin"))
    kw["reduction"] = 0
    direct, gd, _, _ = emu_margin_ce(L, x, t, kw)
    seed = int(kw["seed"])
    kw2 = dict(kw, offset=0)
    ptr, gp, _, _ = emu_margin_ce(L, x, t, kw2, philox_ptrs=(seed, 10, 7))  # 10 + 7 = 17, kw's offset
    torch.testing.assert_close(ptr, direct, rtol=0, atol=0)
    torch.testing.assert_close(gp, gd, rtol=0, atol=0)
    other, _, _, _ = emu_margin_ce(L, x, t, kw2, philox_ptrs=(seed, 10, 8))
    assert not torch.allclose(other, direct)


@needs_ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,C", [(1, 1), (3, 7), (5, 1030)])
@pytest.mark.parametrize("go", ["one", "scalar", "per_row"])
def test_margin_ce_grad_scale(L, dtype, N, C, go):
    """The backward's in-place scale: grad *= grad_output (scalar or per row), exactly as ATen's multiply;
    a scalar 1 leaves the gradient untouched. A cap of 2 blocks makes the grid-stride loop wrap."""
    g = torch.Generator().manual_seed(N * C)
    grad = torch.randn(N, C, generator=g, dtype=torch.float64).to(dtype)
    if go == "one":
        gout = torch.ones((), dtype=dtype)
    elif go == "scalar":
        gout = torch.tensor(-2.75, dtype=dtype)
    else:
        gout = torch.randn(N, generator=g, dtype=torch.float64).to(dtype)
    want = grad * (gout.unsqueeze(1) if go == "per_row" else gout)
    buf = guarded(grad, name="grad")
    gbuf = guarded(gout.reshape(-1), name="grad_output")
    emu.clear_launches()
    L.call("ltk_emu_margin_ce_grad_scale", DTYPE_CODE[dtype], ctypes.c_void_p(buf.data_ptr()),
           ctypes.c_void_p(gbuf.data_ptr()), ctypes.c_longlong(N), ctypes.c_longlong(C), int(go == "per_row"),
           ctypes.c_longlong(2))
    torch.testing.assert_close(buf, want, rtol=0, atol=0)
    (rec,) = emu.launches()
    assert "margin_ce_grad_scale_kernel" in rec["kernel"] and rec["grid"][0] <= 2


@needs_ops
@pytest.mark.parametrize("angular", [a for a in ANGULAR if a != "linear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,C", [(1, 1), (5, 70), (3, 1030)])
def test_margin_ce_angular(L, angular, dtype, N, C):
    x, t, kw = margin_ce_case(N, C, dtype, features=("scale", "margin"), angular=angular)
    _check_vs_op(L, x, t, kw)


@needs_ops
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("N,C", [(3, 5), (4, 1030), (2, 4097)])
def test_margin_ce_philox_noise_matches_cpu_bits(L, seed, N, C):
    """The in-kernel Philox cloud noise must be the CPU's, bit for bit: in float64 a single noise value
    off by one float ulp would move the loss by ~1e-8, far above the 1e-12 tolerance."""
    x, t, kw = margin_ce_case(N, C, torch.float64, seed=seed, features=("cloud_philox", "scale", "margin"))
    kw["noise_mul"] = 3.0
    kw["reduction"] = 0
    with emu.options(seed=seed):
        loss, grad, _, _ = emu_margin_ce(L, x, t, kw)
    r_loss, r_grad, _ = op_margin_ce(x, t, kw)
    torch.testing.assert_close(loss, r_loss, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grad, r_grad, rtol=1e-12, atol=1e-14)
    kw["offset"] += 1  # another offset is another draw
    loss2, _, _, _ = emu_margin_ce(L, x, t, kw)
    assert not torch.allclose(loss, loss2)


@needs_ops
@pytest.mark.parametrize("features,kw_extra", [
    (("scale", "col_scale", "margin"), dict(reduction=2)),
    (("scale", "margin", "weight"), dict(reduction=2)),
    (("target_scale", "margin"), dict(reduction=1)),
    (("col_bias",), dict(reduction=0, label_smoothing=0.1)),
    (("scale",), dict(reduction=3, focal=1, gamma=1.0)),
    (("scale", "weight"), dict(reduction=3, focal=2, gamma=2.0)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("N,C", [(1, 1), (5, 37), (3, 1100)])
def test_margin_ce_vs_reference(L, features, kw_extra, dtype, N, C):
    """Loss and gradient against the eager oracle ltkernels.reference.margin_cross_entropy (autograd)."""
    x, t, kw = margin_ce_case(N, C, dtype, features=features, ignore=True)
    kw.update(kw_extra)
    loss, grad, _, _ = emu_margin_ce(L, x, t, kw)
    xr = x.clone().requires_grad_(True)
    red = {v: k for k, v in REDUCTIONS.items()}[kw["reduction"]]
    ref = reference.margin_cross_entropy(
        xr, t, scale=kw["scale"], col_scale=kw["col_scale"], col_bias=kw["col_bias"], margin=kw["margin"],
        target_scale=kw["target_scale"], weight=kw["weight"], reduction=red,
        focal_gamma=kw["gamma"] if kw["focal"] else None, focal_detach=kw["focal"] != 2,
        ignore_index=kw["ignore_index"], label_smoothing=kw["label_smoothing"])
    ref.sum().backward()
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, ref.detach(), **tol, equal_nan=True)
    torch.testing.assert_close(grad, xr.grad, **tol)


@needs_ops
@pytest.mark.parametrize("smoothing,C", [(0.0, 50), (0.2, 50), (0.2, 3000)])
def test_margin_ce_no_grad_requested(L, smoothing, C):
    """Loss only: with label smoothing the stream kernel still runs its second pass (smoothing's sum over the
    row), writing no gradient."""
    x, t, kw = margin_ce_case(4, C, torch.float32, features=("margin",), weight=smoothing > 0)
    kw["label_smoothing"] = smoothing
    plan = {}
    loss, grad, _, _ = emu_margin_ce(L, x, t, kw, compute_grad=False, plan=plan)
    r_loss, _, _ = op_margin_ce(x, t, kw, compute_grad=False)
    torch.testing.assert_close(loss, r_loss)
    assert grad is None and plan["kernel"] == "margin_ce_stream_kernel"


@needs_ops
def test_margin_ce_target_out_of_range_is_a_device_assert(L):
    x, t, kw = margin_ce_case(3, 10, torch.float32)
    t[1] = 10
    with pytest.raises(EmulatorError, match=r"device-side assertion .*y >= 0 && y < C"):
        emu_margin_ce(L, x, t, kw)


@needs_ops
@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_margin_ce_other_schedules(L, schedule):
    x, t, kw = margin_ce_case(3, 1030, torch.float64, features=("scale", "margin", "weight", "shift"))
    with emu.options(schedule=schedule):
        _check_vs_op(L, x, t, kw)


def _has_op(name):
    return ops is not None and hasattr(ops, name)


# ==== cosine head =========================================================================================
COS_SHAPES = [(1, 1), (3, 7), (9, 33), (40, 3), (5, 300), (70, 65)]
# The cosine kernels use grid-stride loops (any grid is valid), but their grids are capped so high that the
# loops never wrap at test sizes: the clamped_grid cases run at most 2 x 2 blocks so that they do.


COS_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_COS_SFX = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}


def _cos_fn(name, dtype):
    return f"ltk_emu_cosine_{name}_{_COS_SFX[dtype]}"


def _cos_acc(dtype):
    """The kernels' math type for data of `dtype` (cosine_acc_t): norms, dots and scales are passed in it."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _cos_store_tol(dtype):
    """An fp32 result stored once in a 16-bit dtype: one rounding (half an ulp) against a reference rounded
    the same way, so one ulp apart at most; float types keep _tol."""
    return {torch.float16: dict(rtol=2.0 ** -10, atol=1e-6), torch.bfloat16: dict(rtol=2.0 ** -7, atol=1e-6)}.get(
        dtype, _tol(dtype))


@pytest.mark.parametrize("dtype", COS_DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", COS_SHAPES + [(0, 5), (5, 0)])
@pytest.mark.parametrize("vec_rows", [True, False])
@pytest.mark.parametrize("sqrt_out", [True, False])
@pytest.mark.parametrize("clamp", [0, 2], ids=["grid", "clamped_grid"])
def test_cosine_vec_dot(L, clamp, dtype, rows, cols, vec_rows, sqrt_out):
    emu.set_options(clamp_grid=clamp)  # 2: the grid-stride loops wrap
    g = torch.Generator().manual_seed(rows * 100 + cols)
    a = torch.randn(rows, cols, generator=g, dtype=dtype)
    b = a if sqrt_out else torch.randn(rows, cols, generator=g, dtype=dtype)
    n = rows if vec_rows else cols
    acc = _cos_acc(dtype)  # 16-bit data: products and sums in fp32, fp32 results
    out = guarded(torch.full((n,), float("nan"), dtype=acc))
    ga = guarded(a)
    gb = ga if b is a else guarded(b)
    L.call(_cos_fn("vec_dot", dtype), ctypes.c_longlong(rows), ctypes.c_longlong(cols), ptr(ga), ptr(gb),
           int(vec_rows), int(sqrt_out), ptr(out))
    ref = (a.to(acc) * b.to(acc)).sum(1 if vec_rows else 0)
    if sqrt_out:
        ref = ref.sqrt()
    torch.testing.assert_close(out, ref, **_tol(acc))


@pytest.mark.parametrize("dtype", COS_DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", COS_SHAPES)
@pytest.mark.parametrize("vec_rows", [True, False])
def test_cosine_norms(L, dtype, rows, cols, vec_rows):
    m = torch.randn(rows, cols, dtype=dtype)
    acc = _cos_acc(dtype)
    out = guarded(torch.full((rows if vec_rows else cols,), float("nan"), dtype=acc))
    gm = guarded(m)  # keep a reference: the buffer is unmapped when the tensor dies
    L.call(_cos_fn("norms", dtype), ctypes.c_longlong(rows), ctypes.c_longlong(cols), ptr(gm), int(vec_rows),
           ptr(out))
    torch.testing.assert_close(out, m.to(acc).norm(dim=1 if vec_rows else 0), **_tol(acc))
    if _has_op("cosine_norms"):  # the CPU op: same dtype, the same values up to the order of the sums
        torch.testing.assert_close(out, ops.cosine_norms(m, 1 if vec_rows else 0), **_tol(acc))


@pytest.mark.parametrize("dtype", COS_DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", COS_SHAPES + [(0, 4), (4, 0), (3, 600)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "inplace"])
@pytest.mark.parametrize("norms", ["both", "rows", "cols", "none"])
@pytest.mark.parametrize("clamp", [0, 2], ids=["grid", "clamped_grid"])
def test_cosine_scale(L, clamp, dtype, rows, cols, layout, norms):
    emu.set_options(clamp_grid=clamp)  # 2: the grid-stride loops wrap
    g = torch.Generator().manual_seed(rows * 7 + cols)
    eps = 0.3
    base = torch.randn(cols, rows, generator=g, dtype=dtype) if layout == "transposed" else \
        torch.randn(rows, cols, generator=g, dtype=dtype)
    acc = _cos_acc(dtype)
    rn = torch.rand(rows, generator=g, dtype=acc) * 2 if norms in ("both", "rows") else None
    cn = torch.rand(cols, generator=g, dtype=acc) * 2 if norms in ("both", "cols") else None
    src_buf = guarded(base)
    src = src_buf.t() if layout == "transposed" else src_buf
    out = src_buf if layout == "inplace" else guarded(torch.full((rows, cols), float("nan"), dtype=dtype))
    grn, gcn = (guarded(v) if v is not None else None for v in (rn, cn))
    L.call(_cos_fn("scale", dtype), ctypes.c_longlong(rows), ctypes.c_longlong(cols),
           ctypes.c_void_p(src.data_ptr()), ctypes.c_longlong(src.stride(0)), ctypes.c_longlong(src.stride(1)),
           ptr(grn), ptr(gcn), ctypes.c_double(eps), ptr(out))
    src0 = base.t() if layout == "transposed" else base
    ref = src0.to(acc)
    if rn is not None:
        ref = ref / rn.clamp_min(eps)[:, None]
    if cn is not None:
        ref = ref / cn.clamp_min(eps)[None, :]
    torch.testing.assert_close(out.reshape(rows, cols), ref.to(dtype), **_cos_store_tol(dtype))
    if _has_op("cosine_scale_") and rows and cols and layout == "contiguous":  # the CPU op agrees too
        cpu = src0.clone()
        ops.cosine_scale_(cpu, rn, cn, eps)
        # 16-bit: the same fp32 operations in the same order, one rounding: the same bits
        exact = dict(rtol=0, atol=0) if acc != dtype else _tol(dtype)
        torch.testing.assert_close(out, cpu, **exact)


def _tangent_ref(gm, x, vec_rows, norm, eps, prescaled, s):
    d = 1 if vec_rows else 0
    dots = (x * gm).sum(d, keepdim=True)
    n = norm.unsqueeze(d)
    c = torch.where(n >= eps, dots / (n * n), torch.zeros_like(n))
    alpha = s if prescaled else s / n.clamp_min(eps)
    return alpha * (gm - c * x)


@pytest.mark.parametrize("dtype", COS_DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", COS_SHAPES + [(0, 3), (3, 0), (4, 700)])
@pytest.mark.parametrize("vec_rows", [True, False])
@pytest.mark.parametrize("prescaled,scaled", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("clamp", [0, 2], ids=["grid", "clamped_grid"])
def test_cosine_tangent(L, clamp, dtype, rows, cols, vec_rows, prescaled, scaled):
    emu.set_options(clamp_grid=clamp)  # 2: the grid-stride loops wrap
    g = torch.Generator().manual_seed(rows * 13 + cols)
    eps = 0.5
    acc = _cos_acc(dtype)
    x = torch.randn(rows, cols, generator=g, dtype=dtype)
    gm = torch.randn(rows, cols, generator=g, dtype=dtype)
    norm = x.to(acc).norm(dim=1 if vec_rows else 0)
    if norm.numel():
        norm[0] = 0.1  # one vector below eps: no projection
    s = torch.tensor([1.7], dtype=acc) if scaled else None
    gg = guarded(gm)
    ws = None if vec_rows else guarded(torch.full((cols,), float("nan"), dtype=acc))
    gx, gn, gs = guarded(x), guarded(norm), (guarded(s) if s is not None else None)
    L.call(_cos_fn("tangent", dtype), ctypes.c_longlong(rows), ctypes.c_longlong(cols), ptr(gg), ptr(gx),
           int(vec_rows), ptr(gn), ctypes.c_double(eps), int(prescaled), ptr(gs), ptr(ws))
    ref = _tangent_ref(gm.to(acc), x.to(acc), vec_rows, norm, eps, prescaled, float(s) if scaled else 1.0)
    torch.testing.assert_close(gg, ref.to(dtype), **_cos_store_tol(dtype))
    if _has_op("cosine_tangent_") and rows and cols:
        cpu = gm.clone()
        ops.cosine_tangent_(cpu, x, norm, eps, 1 if vec_rows else 0, prescaled, s)
        torch.testing.assert_close(gg, cpu, **_cos_store_tol(dtype))


# (rows, cols) pairs of the two operands of norms_pair: one per vector layout pair, empty sets, a weight of
# more column tiles than the features have row blocks and the reverse
COS_PAIRS = [((1, 1), (1, 1)), ((9, 33), (33, 5)), ((70, 65), (65, 3)), ((3, 7), (7, 300)), ((0, 4), (4, 9)),
             ((5, 3), (3, 0)), ((0, 0), (0, 0))]


@pytest.mark.parametrize("dtype", COS_DTYPES, ids=str)
@pytest.mark.parametrize("shapes", COS_PAIRS, ids=str)
@pytest.mark.parametrize("a_rows,b_rows", [(True, False), (False, True), (True, True), (False, False)])
@pytest.mark.parametrize("clamp", [0, 1, 2], ids=["grid", "one_block", "clamped_grid"])
def test_cosine_norms_pair(L, clamp, dtype, shapes, a_rows, b_rows):
    """Both operands' norms in one launch equal each operand's own norms, for any grid (a one-block grid
    does both sets in turn)."""
    emu.set_options(clamp_grid=clamp)
    g = torch.Generator().manual_seed(sum(shapes[0]) * 31 + sum(shapes[1]))
    acc = _cos_acc(dtype)
    a, b = (torch.randn(*sh, generator=g, dtype=dtype) for sh in shapes)
    na, nb = (m.shape[0] if r else m.shape[1] for m, r in ((a, a_rows), (b, b_rows)))
    oa, ob = (guarded(torch.full((n,), float("nan"), dtype=acc)) for n in (na, nb))
    ga, gb = guarded(a), guarded(b)
    emu.clear_launches()
    L.call(_cos_fn("norms_pair", dtype), ctypes.c_longlong(a.shape[0]), ctypes.c_longlong(a.shape[1]), ptr(ga),
           int(a_rows), ptr(oa), ctypes.c_longlong(b.shape[0]), ctypes.c_longlong(b.shape[1]), ptr(gb), int(b_rows),
           ptr(ob))
    assert len(emu.launches()) == (1 if na + nb else 0)
    torch.testing.assert_close(oa, a.to(acc).norm(dim=1 if a_rows else 0), **_tol(acc))
    torch.testing.assert_close(ob, b.to(acc).norm(dim=1 if b_rows else 0), **_tol(acc))


def _scale_dots_parts(L, rows, cols):
    """The partial-sum counts launch_scale_dots writes: (row parts, column parts)."""
    fr, fc = L.ltk_emu_cosine_scale_dots_row_parts, L.ltk_emu_cosine_scale_dots_col_parts
    fr.restype = fc.restype = ctypes.c_longlong
    return fr(ctypes.c_longlong(cols)), fc(ctypes.c_longlong(rows))


@pytest.mark.parametrize("dtype", COS_DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", COS_SHAPES + [(33, 257), (64, 256), (100, 600)])
@pytest.mark.parametrize("want", ["both", "rows", "cols", "none"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("clamp", [0, 2], ids=["grid", "clamped_grid"])
def test_cosine_scale_dots(L, clamp, dtype, rows, cols, want, inplace):
    """The backward prologue: G / |x_i| / |w_j| and the partial row / column sums of G * c, one launch; each
    (row tile, column tile) writes its own part, so the parts add up to the sums for any grid."""
    emu.set_options(clamp_grid=clamp)
    g = torch.Generator().manual_seed(rows * 11 + cols)
    eps = 0.3
    acc = _cos_acc(dtype)
    src = torch.randn(rows, cols, generator=g, dtype=dtype)
    c = torch.rand(rows, cols, generator=g, dtype=dtype) * 2 - 1
    rn = torch.rand(rows, generator=g, dtype=acc) * 2
    cn = torch.rand(cols, generator=g, dtype=acc) * 2
    prow, pcol = _scale_dots_parts(L, rows, cols)
    assert (prow, pcol) == (-(-cols // 256), -(-rows // 32))
    rp = guarded(torch.full((prow, rows), float("nan"), dtype=acc)) if want in ("both", "rows") else None
    cp = guarded(torch.full((pcol, cols), float("nan"), dtype=acc)) if want in ("both", "cols") else None
    gs, gc, grn, gcn = guarded(src), guarded(c), guarded(rn), guarded(cn)
    out = gs if inplace else guarded(torch.full((rows, cols), float("nan"), dtype=dtype))
    emu.clear_launches()
    L.call(_cos_fn("scale_dots", dtype), ctypes.c_longlong(rows), ctypes.c_longlong(cols), ptr(gs), ptr(gc), ptr(grn),
           ptr(gcn), ctypes.c_double(eps), ptr(out), ptr(rp), ptr(cp))
    assert len(emu.launches()) == 1
    ref = src.to(acc) / rn.clamp_min(eps)[:, None] / cn.clamp_min(eps)[None, :]
    torch.testing.assert_close(out, ref.to(dtype), **_cos_store_tol(dtype))
    cpu_dots = None
    if _has_op("cosine_grad_prep_"):  # the CPU op's scaled gradient: the same fp32 operations, one rounding
        cpu = src.clone()
        cpu_dots = ops.cosine_grad_prep_(cpu, c, rn, cn, eps)
        exact = dict(rtol=0, atol=0) if acc != dtype else _tol(dtype)
        torch.testing.assert_close(out, cpu, **exact)
    for parts, dim, k in ((rp, 1, 0), (cp, 0, 1)):
        if parts is not None:
            _assert_sums_close(parts.sum(0), src, c, dim)
            if cpu_dots is not None:
                _assert_sums_close(cpu_dots[k], src, c, dim)


def _assert_sums_close(got, a, b, dim):
    """Sums of a * b along `dim` in the accumulation type against float64: sums of many terms of either
    sign, so the budget is relative to sum |a b| (the rounding-error bound of a sum, with a chain of up to
    32 additions per element: 8 per lane, 5 shuffle levels, the parts; a serial CPU sum differs in order only)."""
    v = a.double() * b.double()
    bound = 32 * torch.finfo(got.dtype).eps * v.abs().sum(dim) + 1e-30
    err = (got.double() - v.sum(dim)).abs()
    assert bool((err <= bound).all()), f"sum error {err.max().item():.3g} above its bound {bound.min().item():.3g}"


@pytest.mark.parametrize("dtype", COS_DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", COS_SHAPES + [(0, 3), (3, 0), (40, 700)])
@pytest.mark.parametrize("vec_rows", [True, False])
@pytest.mark.parametrize("n_parts", [0, 1, 3])
@pytest.mark.parametrize("clamp", [0, 2], ids=["grid", "clamped_grid"])
def test_cosine_tangent_dots(L, clamp, dtype, rows, cols, vec_rows, n_parts):
    """The tangent projection with known dot products given as n_parts partial sums, one launch. Both vector
    layouts read the parts; with no parts (a null pointer here) row vectors compute the dots in their warp
    pass and column vectors take them as 0."""
    emu.set_options(clamp_grid=clamp)
    g = torch.Generator().manual_seed(rows * 17 + cols + n_parts)
    eps, s = 0.5, 1.3
    acc = _cos_acc(dtype)
    x = torch.randn(rows, cols, generator=g, dtype=dtype)
    gm = torch.randn(rows, cols, generator=g, dtype=dtype)
    d = 1 if vec_rows else 0
    norm = x.to(acc).norm(dim=d)
    if norm.numel():
        norm[-1] = 0.1  # one vector below eps: no projection
    dots = (x.to(acc) * gm.to(acc)).sum(d)
    if n_parts:
        dots = dots * 0.5  # given dots unlike x · g: a kernel that computed its own would fail the comparison
    if vec_rows or n_parts:
        parts = torch.rand(max(n_parts, 1), dots.numel(), generator=g, dtype=acc)
        parts[-1] += dots - parts.sum(0)  # the parts add up to the dots
        parts = parts[:n_parts] if n_parts else parts[:0]
    else:
        parts = torch.zeros(0, dots.numel(), dtype=acc)
        dots = torch.zeros_like(dots)  # no parts: the column kernel takes the dots as 0
    gg, gx, gn, gp, gsc = guarded(gm), guarded(x), guarded(norm), guarded(parts), guarded(torch.tensor([s], dtype=acc))
    emu.clear_launches()
    L.call(_cos_fn("tangent_dots", dtype), ctypes.c_longlong(rows), ctypes.c_longlong(cols), ptr(gg), ptr(gx),
           int(vec_rows), ptr(gn), ptr(gp), ctypes.c_longlong(n_parts), ctypes.c_double(eps), 1, ptr(gsc))
    assert len(emu.launches()) == (1 if rows and cols else 0)
    dd = dots.unsqueeze(d)
    n = norm.unsqueeze(d)
    ref = s * (gm.to(acc) - torch.where(n >= eps, dd / (n * n), torch.zeros_like(n)) * x.to(acc))
    torch.testing.assert_close(gg, ref.to(dtype), **_cos_store_tol(dtype))


def test_cosine_grid_stride_loops_wrap(L):
    """With a 1-SM emulated device the launch functions still cap the grids; force many rows per block."""
    rows, cols = 2000, 3
    m = torch.randn(rows, cols, dtype=torch.float64)
    out = guarded(torch.full((rows,), float("nan"), dtype=torch.float64))
    emu.clear_launches()
    gm = guarded(m)
    L.call("ltk_emu_cosine_norms_f64", ctypes.c_longlong(rows), ctypes.c_longlong(cols), ptr(gm), 1, ptr(out))
    torch.testing.assert_close(out, m.norm(dim=1))
    assert emu.launches()[0]["grid"][0] == (rows + 7) // 8


# ==== coverage ============================================================================================
def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.S)
    return re.sub(r"//[^\n]*", " ", src)


def global_kernels(path: str) -> list[str]:
    """Names of the __global__ functions defined in a CUDA source."""
    src = _strip_comments(open(path).read())
    names = []
    for m in re.finditer(r"\b__global__\b", src):
        head = src[m.end():m.end() + 600]
        # drop launch-bound annotations (possibly with nested parentheses)
        head = re.sub(r"(__launch_bounds__|C10_LAUNCH_BOUNDS_\w*)\s*\((?:[^()]|\([^()]*\))*\)", " ", head)
        mm = re.search(r"(\w+)\s*\(", head)
        if mm:
            names.append(mm.group(1))
    return names


def test_global_kernel_parser():
    import tempfile

    src = """
    // __global__ void commented_out(int)
    template <typename T, int N>
    __global__ void __launch_bounds__(N * (2), 4) k1(const T* x) {}
    __global__ static void k2(int) {}
    template <typename T> __global__ void C10_LAUNCH_BOUNDS_1(256)
        k3(T a);
    """
    with tempfile.NamedTemporaryFile("w", suffix=".cuh", delete=False) as f:
        f.write(src)
    try:
        assert global_kernels(f.name) == ["k1", "k2", "k3"]
    finally:
        os.unlink(f.name)


def test_every_cuda_kernel_is_emulated(L):
    """Every __global__ kernel in csrc/cuda/*.cuh has an emulation test registered in KERNEL_COVERAGE
    (and that test exists here); no kernel is defined in a .cu, where the emulator cannot reach it."""
    in_cu = {os.path.basename(p): global_kernels(p) for p in glob.glob(os.path.join(CUDA_DIR, "*.cu"))}
    assert not any(in_cu.values()), f"kernels defined in .cu files cannot be emulated; move them to a .cuh: {in_cu}"
    kernels = {}
    for p in sorted(glob.glob(os.path.join(CUDA_DIR, "*.cuh"))):
        for k in global_kernels(p):
            kernels[k] = os.path.basename(p)
    missing = sorted(k for k in kernels if k not in KERNEL_COVERAGE)
    assert not missing, (
        f"CUDA kernels without emulation coverage: {[(k, kernels[k]) for k in missing]}. Add a wrapper in "
        "python_tests/emu/ and a test in python_tests/test_emulation_kernels.py, then list the kernel in "
        "KERNEL_COVERAGE (docs/emulator.md, 'Adding a kernel').")
    for k, test in KERNEL_COVERAGE.items():
        assert test in globals(), f"KERNEL_COVERAGE names a missing test {test} for {k}"
    stale = sorted(k for k in KERNEL_COVERAGE if k not in kernels)
    assert not stale, f"KERNEL_COVERAGE lists kernels that no longer exist in csrc/cuda: {stale}"


@needs_ops
def test_registered_kernels_really_launch(L):
    """Runs one small case of each family and checks the launch log names every registered kernel."""
    emu.clear_launches()
    x, t, kw = margin_ce_case(2, 10, torch.float32)
    emu_margin_ce(L, x, t, kw)  # the stream kernel
    emu_margin_ce(L, x.double(), t, kw)  # the generic one
    gs, go = guarded(torch.randn(2, 10)), guarded(torch.full((1,), 3.0))
    L.call("ltk_emu_margin_ce_grad_scale", DTYPE_CODE[torch.float32], ctypes.c_void_p(gs.data_ptr()),
           ctypes.c_void_p(go.data_ptr()), ctypes.c_longlong(2), ctypes.c_longlong(10), 0, ctypes.c_longlong(4))
    a = torch.randn(6, 5, dtype=torch.float64)
    out = torch.empty(6, dtype=torch.float64)
    g, norm, dst = a.clone(), torch.ones(6, dtype=torch.float64), a.clone()
    for vr in (1, 0):
        L.call("ltk_emu_cosine_vec_dot_f64", ctypes.c_longlong(6), ctypes.c_longlong(5), ptr(a), ptr(a), vr, 1,
               ptr(out))
        L.call("ltk_emu_cosine_tangent_f64", ctypes.c_longlong(6), ctypes.c_longlong(5), ptr(g), ptr(a), vr,
               ptr(norm), ctypes.c_double(1e-12), 0, ptr(None), ptr(out))
    L.call("ltk_emu_cosine_scale_f64", ctypes.c_longlong(6), ctypes.c_longlong(5), ptr(a), ctypes.c_longlong(5),
           ctypes.c_longlong(1), ptr(None), ptr(None), ctypes.c_double(1e-12), ptr(dst))
    out5 = torch.empty(5, dtype=torch.float64)
    L.call("ltk_emu_cosine_norms_pair_f64", ctypes.c_longlong(6), ctypes.c_longlong(5), ptr(a), 1, ptr(out),
           ctypes.c_longlong(6), ctypes.c_longlong(5), ptr(a), 0, ptr(out5))
    L.call("ltk_emu_cosine_scale_dots_f64", ctypes.c_longlong(6), ctypes.c_longlong(5), ptr(a), ptr(a), ptr(norm),
           ptr(out5), ctypes.c_double(1e-12), ptr(dst), ptr(None), ptr(out5))
    u, n3 = torch.rand(3, 3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    fu = u.clone()
    L.call("ltk_emu_uniformity_pair_transform_f64", ctypes.c_longlong(3), ctypes.c_longlong(3), ptr(u), ptr(fu),
           ptr(n3), ptr(n3), 1, 1, ctypes.c_double(1.0), ctypes.c_double(1e-12))
    L.call("ltk_emu_uniformity_exp_shift_f64", ctypes.c_longlong(3), ctypes.c_longlong(3), ptr(u), ptr(n3), ptr(n3),
           ptr(fu), ptr(None))
    launched = " ".join(r["kernel"] for r in emu.launches())
    for k in KERNEL_COVERAGE:
        assert re.search(rf"::{k}\b", launched), f"{k} was not launched by its emulation wrapper"


# ==== resources of the real compilation vs the emulated launch configurations =============================
def _resource_report():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import cuda_resource_report as crr

    if crr.find_nvcc() is None or not glob.glob(os.path.join(CUDA_DIR, "*.cu")):
        return None
    import tempfile

    with tempfile.TemporaryDirectory() as td:  # the compile results themselves are cached by the tool
        out = os.path.join(td, "r.json")
        p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cuda_resource_report.py"), "--json", out,
                            "--out", os.path.join(td, "r.md")], capture_output=True, text=True, timeout=1800)
        if p.returncode == 2:
            pytest.fail(f"a .cu does not compile:\n{p.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


@pytest.mark.slow
@needs_ops
def test_launch_configs_fit_compiled_resources(L):
    """The block sizes the launch functions choose (seen by the emulator) must fit the compiled kernels:
    at most their __launch_bounds__, and at most what their register count allows (a bigger block fails
    on a GPU with 'too many resources requested for launch'). Needs nvcc (compile gate), not a GPU."""
    rep = _resource_report()
    if rep is None:
        pytest.skip("no nvcc: the compiled resources are unknown")
    import cuda_resource_report as crr

    funcs = [f for r in rep["results"] for f in r["functions"] if f["entry"]]
    dem = crr.demangle([f["function"] for f in funcs])
    emu.clear_launches()
    test_registered_kernels_really_launch(L)
    for C in (1, 100, 5000):
        x, t, kw = margin_ce_case(2, C, torch.float64)
        emu_margin_ce(L, x, t, kw)
    checked = 0
    for rec in emu.launches():
        threads = rec["block"][0] * rec["block"][1] * rec["block"][2]
        name = re.sub(r"\s+", "", rec["kernel"])
        for f in funcs:
            if re.sub(r"\s+", "", dem[f["function"]]) == name:
                checked += 1
                bound = f.get("launch_bound") or 1024
                assert threads <= bound, f"{name}: {threads} threads > __launch_bounds__ {bound} ({f['arch']})"
                assert threads <= f["reg_limited_threads"], (
                    f"{name}: {threads} threads x {f['registers']} registers exceed the register file ({f['arch']})")
    assert checked, "no emulated launch matched a compiled kernel"


# ==== the same cases on a real GPU =========================================================================
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or ops is None, reason="needs a CUDA device and the CUDA build of ltkernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,C", SHAPES + [(6, 37), (5, 1100)])
@pytest.mark.parametrize("feat", sorted(FEATURES))
def test_cuda_margin_ce_matches_cpu_and_emulator(L, dtype, N, C, feat):
    x, t, kw = margin_ce_case(N, C, dtype, features=FEATURES[feat])
    c_loss, c_grad, c_gs = op_margin_ce(x, t, kw, device="cuda")
    r_loss, r_grad, r_gs = op_margin_ce(x, t, kw, device="cpu")
    e_loss, e_grad, e_gs, _ = emu_margin_ce(L, x, t, kw)
    # the GPU uses fast intrinsics and FMA contraction: a little looser than emulator vs CPU
    tol = {k: v * 4 for k, v in _tol(dtype).items()}
    for got in ((c_loss, c_grad), (e_loss, e_grad)):
        torch.testing.assert_close(got[0], r_loss, **tol, equal_nan=True)
        torch.testing.assert_close(got[1], r_grad, **tol, equal_nan=True)


# ==== uniformity (ltkernels.regularisers; tile epilogues of csrc/cuda/uniformity_kernels.cuh) =============
UNIF_SHAPES = [(1, 1), (2, 2), (3, 7), (9, 33), (40, 3), (5, 300), (70, 65)]


def _unif_fn(name, dtype):
    return f"ltk_emu_uniformity_{name}_{'f64' if dtype == torch.float64 else 'f32'}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bi,bk", UNIF_SHAPES + [(0, 3), (3, 0)])
@pytest.mark.parametrize("kernel,param", [(0, 2.0), (1, 1.0), (1, 2.0), (1, 0.5), (2, 0.0)],
                         ids=["gaussian", "riesz1", "riesz2", "riesz0.5", "log"])
@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("clamp", [0, 2], ids=["grid", "clamped_grid"])
def test_uniformity_pair_transform(L, clamp, dtype, bi, bk, kernel, param, diag):
    if diag and bi != bk:
        pytest.skip("diagonal tiles are square")
    emu.set_options(clamp_grid=clamp)
    g = torch.Generator().manual_seed(bi * 7 + bk)
    nI = 1.0 - 0.2 * torch.rand(bi, generator=g, dtype=dtype)
    nK = 1.0 - 0.2 * torch.rand(bk, generator=g, dtype=dtype)
    gram = torch.rand(bi, bk, generator=g, dtype=dtype) * 2 - 1
    if bi and bk:
        gram[0, 0] = (nI[0] + nK[0]) / 2  # distance 0: clamped
    dist_eps = 1e-12
    gbuf = guarded(gram)
    fbuf = guarded(torch.full((bi, bk), float("nan"), dtype=dtype))
    gnI, gnK = guarded(nI), guarded(nK)  # kept alive across the call
    L.call(_unif_fn("pair_transform", dtype), ctypes.c_longlong(bi), ctypes.c_longlong(bk), ptr(gbuf), ptr(fbuf),
           ptr(gnI), ptr(gnK), ctypes.c_int(int(diag)), ctypes.c_int(kernel), ctypes.c_double(param),
           ctypes.c_double(dist_eps))
    d2 = nI[:, None] + nK[None, :] - 2 * gram
    x = d2.clamp_min(dist_eps)
    eye = torch.eye(bi, bk, dtype=torch.bool) if diag else torch.zeros(bi, bk, dtype=torch.bool)
    clamped = ~(d2 >= dist_eps)
    if kernel == 0:
        ref = (-param * x).masked_fill(eye, float("-inf"))
        torch.testing.assert_close(gbuf.reshape(bi, bk), ref, **_tol(dtype))
        return
    f = -0.5 * x.log() if kernel == 2 else x.pow(-0.5 * param)
    p = (torch.full_like(x, -0.5) / x) if kernel == 2 else -0.5 * param * f / x
    p = p.masked_fill(clamped | eye, 0.0)
    torch.testing.assert_close(fbuf.reshape(bi, bk), f.masked_fill(eye, 0.0), **_tol(dtype))
    torch.testing.assert_close(gbuf.reshape(bi, bk), p, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bi,bk", UNIF_SHAPES + [(0, 3), (3, 0)])
@pytest.mark.parametrize("mode", ["both", "row_only", "inplace"])
@pytest.mark.parametrize("clamp", [0, 2], ids=["grid", "clamped_grid"])
def test_uniformity_exp_shift(L, clamp, dtype, bi, bk, mode):
    emu.set_options(clamp_grid=clamp)
    g = torch.Generator().manual_seed(bi * 5 + bk)
    a = -8 * torch.rand(bi, bk, generator=g, dtype=dtype)
    if bi and bk:
        a[0, 0] = float("-inf")
    mI = -torch.rand(bi, generator=g, dtype=dtype)
    mK = -torch.rand(bk, generator=g, dtype=dtype)
    abuf = guarded(a)
    prow = abuf if mode == "inplace" else guarded(torch.full((bi, bk), float("nan"), dtype=dtype))
    pcol = None if mode == "row_only" else guarded(torch.full((bi, bk), float("nan"), dtype=dtype))
    gmI, gmK = guarded(mI), guarded(mK)  # kept alive across the call
    L.call(_unif_fn("exp_shift", dtype), ctypes.c_longlong(bi), ctypes.c_longlong(bk), ptr(abuf),
           ptr(gmI), ptr(gmK), ptr(prow), ptr(pcol))
    torch.testing.assert_close(prow.reshape(bi, bk), (a - mI[:, None]).exp(), **_tol(dtype))
    if pcol is not None:
        torch.testing.assert_close(pcol.reshape(bi, bk), (a - mK[None, :]).exp(), **_tol(dtype))
