"""Self-tests of the SIMT emulator (csrc/emu) on toy kernels (python_tests/emu/toy_kernels.cuh).

Proves that the emulator runs correct kernels correctly (block reductions with shuffles and shared
memory, grid-stride loops, atomics, dynamic shared memory, votes), that the seeded mutants of the same
kernels FAIL (a removed __syncthreads, a shifted index), and that misuse ends in an EmulatorError rather
than a hang or a crash. Kernel tests of the project's real kernels: test_emulation_kernels.py.

The mutant tests here run with the sanitizer off (``sanitize=False``): they prove what the scheduler and
the poisoned shared memory catch on their own. test_emulation_sanitizer.py shows the sanitizer catching
the same mutants (and those that the schedule cannot) with a precise message.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

import emu
from emu import EmulatorError, ptr

SEEDS = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def L():
    return emu.lib()


@pytest.fixture(autouse=True)
def _default_options(L):
    emu.set_options(seed=0x5EED, schedule="random", timeout_s=60.0, sm_count=4, poison=True, shuffle_blocks=True,
                    clamp_grid=0)
    yield


def _row_sum(L, x, threads, prefix="ltk_emu_toy_"):
    fn = {torch.float32: "row_sum_f32", torch.float64: "row_sum_f64", torch.int32: "row_sum_i32"}[x.dtype]
    N, C = x.shape
    out = emu.guarded(torch.zeros(N, dtype=x.dtype))
    L.call(prefix + fn, ptr(x), ptr(out), N, C, threads)
    return out


# ---- correct kernels ----------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [32, 128, 256, 1024])
@pytest.mark.parametrize("C", [1, 37, 256, 1000, 2500])
def test_row_sum_shapes(L, threads, C):
    x = emu.guarded(torch.randn(3, C, dtype=torch.float64))
    out = _row_sum(L, x, threads)
    torch.testing.assert_close(out, x.sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32])
@pytest.mark.parametrize("schedule", ["random", "forward", "reverse"])
def test_row_sum_dtypes_schedules(L, dtype, schedule):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 300, generator=g) * 10).to(dtype)
    x = emu.guarded(x)
    with emu.options(schedule=schedule):
        out = _row_sum(L, x, 128)
    ref = x.double().sum(1).to(dtype)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_row_sum_launch_config_is_logged(L):
    emu.clear_launches()
    x = torch.randn(7, 50)
    _row_sum(L, x, 256)
    (rec,) = emu.launches()
    assert rec["grid"] == (7, 1, 1) and rec["block"] == (256, 1, 1) and rec["smem"] == 0
    assert "row_sum_kernel<float, 256>" in rec["kernel"] and not rec["failed"]
    assert rec["switches"] >= 7 * 256


def test_same_seed_same_interleaving(L):
    x = torch.randn(3, 100)
    runs = []
    for seed in (11, 11, 12):
        emu.clear_launches()
        with emu.options(seed=seed):
            _row_sum(L, x, 128)
        runs.append(emu.launches()[0]["switches"])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("n", [0, 1, 127, 128, 129, 5000])
@pytest.mark.parametrize("max_blocks", [1, 3, 1 << 20])
def test_axpy_grid_stride(L, n, max_blocks):
    x = emu.guarded(torch.randn(n))
    y0 = torch.randn(n)
    y = emu.guarded(y0)
    L.call("ltk_emu_toy_axpy_f32", ctypes.c_longlong(n), ctypes.c_float(2.5), ptr(x), ptr(y), max_blocks)
    torch.testing.assert_close(y, 2.5 * x + y0)


@pytest.mark.parametrize("dtype,fn", [(torch.float32, "sum_atomic_f32"), (torch.float64, "sum_atomic_f64")])
@pytest.mark.parametrize("n,blocks", [(1, 1), (1000, 3), (4097, 16)])
def test_atomic_sum(L, dtype, fn, n, blocks):
    x = emu.guarded(torch.randn(n, dtype=dtype))
    out = emu.guarded(torch.full((1,), 0.5, dtype=dtype))
    L.call("ltk_emu_toy_" + fn, ctypes.c_longlong(n), ptr(x), ptr(out), blocks)
    torch.testing.assert_close(out[0], x.double().sum().to(dtype) + 0.5, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bx,by", [(32, 1), (8, 4), (16, 3), (1, 64)])
@pytest.mark.parametrize("n", [1, 31, 100, 1000])
def test_dynamic_shared_tile_reverse(L, bx, by, n):
    x = emu.guarded(torch.arange(n, dtype=torch.float32))
    y = emu.guarded(torch.zeros(n))
    L.call("ltk_emu_toy_tile_reverse_f32", ctypes.c_longlong(n), ptr(x), ptr(y), bx, by)
    nt = bx * by
    ref = torch.cat([t.flip(0) for t in x.split(nt)])
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("threads", [32, 96, 256])
def test_votes(L, threads):
    blocks = 2
    g = torch.Generator().manual_seed(threads)
    pred = (torch.rand(blocks * threads, generator=g) < 0.3).to(torch.int32)
    pred[:32] = 1  # one warp where all lanes vote yes
    pred[32:64] = 0 if threads > 32 else 1
    W = threads // 32
    ballot = torch.zeros(blocks * W, dtype=torch.int64)  # unsigned 32-bit in the low half
    ballot32 = torch.zeros(blocks * W, dtype=torch.int32)
    any_all = torch.zeros(2 * blocks * W, dtype=torch.int32)
    count = torch.zeros(blocks, dtype=torch.int32)
    L.call("ltk_emu_toy_vote", ptr(pred), ptr(ballot32), ptr(any_all), ptr(count), blocks, threads)
    ballot = ballot32.to(torch.int64) & 0xFFFFFFFF
    p = pred.view(blocks, W, 32)
    want = (p.to(torch.int64) << torch.arange(32)).sum(-1).view(-1)
    assert torch.equal(ballot, want)
    assert torch.equal(any_all[0::2], p.any(-1).view(-1).to(torch.int32))
    assert torch.equal(any_all[1::2], p.all(-1).view(-1).to(torch.int32))
    assert torch.equal(count, pred.view(blocks, threads).sum(1).to(torch.int32))


def _shfl_model(kind, lane, arg, width):
    """Source lane per the CUDA programming guide's description of each shuffle (the hardware uses the
    low 5 bits of the lane / delta operand: PTX shfl.sync's b[4:0])."""
    base = lane // width * width
    arg %= 32
    if kind == 0:  # __shfl_sync: lane srcLane % width of my group
        return base + arg % width
    if kind == 1:  # __shfl_up_sync: lane - delta, own value if that leaves my group
        return lane - arg if lane - arg >= base else lane
    if kind == 2:  # __shfl_down_sync: lane + delta, own value if that leaves my group
        return lane + arg if lane + arg < base + width else lane
    src = lane ^ arg  # __shfl_xor_sync: earlier groups are readable, later ones give the own value
    return src if src < base + width else lane


@pytest.mark.parametrize("arg", [0, 1, 3, 5, 8, 17, 31, 33])
def test_shuffle_semantics(L, arg):
    threads = 64
    out = torch.full((24 * threads,), -1, dtype=torch.int32)
    L.call("ltk_emu_toy_shfl", ptr(out), threads, arg)
    out = out.view(6, 4, threads)
    for wi, width in enumerate([1, 2, 4, 8, 16, 32]):
        for kind in range(4):
            want = [1000 + (t // 32) * 32 + _shfl_model(kind, t % 32, arg, width) for t in range(threads)]
            assert out[wi, kind].tolist() == want, (width, ["idx", "up", "down", "xor"][kind])


# ---- seeded mutants: the same kernels, broken, must fail ---------------------------------------------------
@pytest.fixture
def no_sanitizer(L):
    """The plain emulator: schedule and poison only (the sanitizer would report these mutants first)."""
    with emu.options(sanitize=False):
        yield


@pytest.mark.parametrize("schedule", ["random", "uniform", "warps"])
@pytest.mark.parametrize("seed", SEEDS)
def test_mutant_missing_syncthreads_fails(L, no_sanitizer, seed, schedule):
    """row_sum with the __syncthreads between the per-warp shared-memory writes and the final warp's
    reads removed (toy_mutant_sync.cpp): under the seeded random schedule the final warp reads slots that
    other warps have not written yet (poisoned: NaN), so the result is wrong. The correct kernel passes
    with the same seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 1000, generator=g, dtype=torch.float64)
    with emu.options(seed=seed, schedule=schedule):
        good = _row_sum(L, x, 256)
        bad = _row_sum(L, x, 256, prefix="ltk_emu_toy_nosync_")
    torch.testing.assert_close(good, x.sum(1), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(bad, x.sum(1)), "the mutant without __syncthreads went undetected"


@pytest.mark.parametrize("seed", SEEDS)
def test_mutant_missing_syncthreads_dynamic_smem_fails(L, no_sanitizer, seed):
    n = 1000
    x = emu.guarded(torch.arange(n, dtype=torch.float32))
    ref = torch.cat([t.flip(0) for t in x.split(256)])
    with emu.options(seed=seed):
        y = emu.guarded(torch.zeros(n))
        L.call("ltk_emu_toy_tile_reverse_f32", ctypes.c_longlong(n), ptr(x), ptr(y), 64, 4)
        torch.testing.assert_close(y, ref)
        y = emu.guarded(torch.zeros(n))
        L.call("ltk_emu_toy_nosync_tile_reverse_f32", ctypes.c_longlong(n), ptr(x), ptr(y), 64, 4)
    assert not torch.equal(y, ref)


def test_mutant_missing_syncthreads_escapes_a_fixed_order(L, no_sanitizer):
    """Why the schedule is randomised: in reverse thread order (the last warps write their slots before
    warp 0 reads them) the mutant without __syncthreads happens to compute the right sums, so a fixed
    order can miss a missing barrier; the random schedule above catches it for every seed (and the
    sanitizer in any order: test_emulation_sanitizer.py)."""
    x = torch.randn(4, 1000, dtype=torch.float64)
    with emu.options(schedule="reverse"):
        bad = _row_sum(L, x, 256, prefix="ltk_emu_toy_nosync_")
    torch.testing.assert_close(bad, x.sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_mutant_missing_syncthreads_fails_without_poison(L, no_sanitizer, seed):
    """Even without poisoned shared memory the mutant reads stale slots from the previous block."""
    x = torch.randn(4, 1000, dtype=torch.float64)
    with emu.options(seed=seed, poison=False):
        bad = _row_sum(L, x, 256, prefix="ltk_emu_toy_nosync_")
    assert not torch.allclose(bad, x.sum(1))


def _row_stats(L, x, prefix):
    out = emu.guarded(torch.full((2 * x.shape[0],), float("nan"), dtype=torch.float64))
    L.call(prefix + "row_stats_f64", ptr(x), ptr(out), x.shape[0], x.shape[1])
    return out.view(-1, 2)


@pytest.mark.parametrize("schedule", ["random", "warps"])
@pytest.mark.parametrize("seed", SEEDS)
def test_mutant_missing_reuse_barrier_fails(L, no_sanitizer, seed, schedule):
    """Two block reductions in a row sharing the slots, without the barrier after the first one's reads
    (toy_mutant_reuse.cpp): a warp that runs ahead writes its slot for the second reduction while a slower
    warp still reads the first one's. Caught by the warp-priority schedule (part of the default random
    schedule); the correct kernel passes."""
    x = torch.randn(6, 3000, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref = torch.stack([x.sum(1), (x * x).sum(1)], 1)
    with emu.options(seed=seed, schedule=schedule):
        torch.testing.assert_close(_row_stats(L, x, "ltk_emu_toy_"), ref, rtol=1e-12, atol=1e-12)
        bad = _row_stats(L, x, "ltk_emu_toy_reuse_")
    assert not torch.allclose(bad, ref), "the mutant without the reuse barrier went undetected"


def test_mutant_missing_reuse_barrier_escapes_uniform_interleaving(L, no_sanitizer):
    """Why warp priorities: with every thread drawn uniformly, all warps progress in step and the reuse
    race never materialises (the sanitizer reports it in any order: test_emulation_sanitizer.py)."""
    x = torch.randn(6, 3000, dtype=torch.float64)
    with emu.options(schedule="uniform"):
        bad = _row_stats(L, x, "ltk_emu_toy_reuse_")
    torch.testing.assert_close(bad, torch.stack([x.sum(1), (x * x).sum(1)], 1), rtol=1e-12, atol=1e-12)


def test_mutant_shifted_index_fails(L):
    """axpy whose grid-stride loop starts one element late: it skips element 0 and touches element n,
    which lies on the guard page of the buffer -> EmulatorError naming the out-of-bounds offset."""
    n = 1000
    x, y = emu.guarded(torch.randn(n)), emu.guarded(torch.randn(n))
    with pytest.raises(EmulatorError, match=r"out-of-bounds global memory access at byte offset 4000"):
        L.call("ltk_emu_toy_shift_axpy_f32", ctypes.c_longlong(n), ctypes.c_float(1.0), ptr(x), ptr(y), 3)


def test_mutant_shifted_index_fails_without_guard(L, no_sanitizer):
    """Without guarded buffers (and without the sanitizer's memcheck) the shifted kernel still gives a
    wrong answer for element 0."""
    n = 1000
    x, y0 = torch.randn(n + 1), torch.randn(n + 1)  # one spare element so the overrun stays in bounds
    y = y0.clone()
    L.call("ltk_emu_toy_shift_axpy_f32", ctypes.c_longlong(n), ctypes.c_float(1.0), ptr(x), ptr(y), 3)
    assert not torch.allclose(y[:n], x[:n] + y0[:n])


# ---- misuse surfaces as EmulatorError, never a hang or a crash ------------------------------------------
BAD = {
    "divergent_barrier": r"every thread of the block must reach every barrier",
    # which of the two messages depends on the order: the barrier after an exit, or an exit during a wait
    "early_return": r"(__syncthreads at .*toy_kernels.cuh:\d+ is reached after \d+ thread\(s\) of the block exited"
                    r"|exits while \d+ thread\(s\) of the block wait at __syncthreads at .*toy_kernels.cuh:\d+)",
    "two_barriers": r"divergent barriers",
    "shfl_exited_lane": r"__shfl_xor_sync at .*: lane \d+ of warp 0 reads lane \d+, which has exited",
    "shfl_divergent": r"divergent warp collective",
    "shfl_vs_barrier": r"divergent warp",
    "smem_oob": r"out-of-bounds (write to )?dynamic shared memory",
    "global_oob": r"out-of-bounds global memory access at byte offset 160 of a guarded buffer of 160 bytes",
    "spin": r"timeout",
    "assert": r"device-side assertion .*negative label.* failed",
    "stack_overflow": r"stack overflow of an emulated thread",
    "div_zero": r"SIGFPE",
    "partial_warp": r"reads lane \d+, which does not exist \(blockDim is not a multiple of 32\)",
    "zero_grid": r"a grid dimension is 0",
    "big_block": r"blockDim exceeds",
    "grid_y": r"gridDim exceeds",
    "smem_limit": r"exceed the limit of 49152",
}


@pytest.mark.parametrize("which", sorted(BAD))
def test_misuse_raises(L, which):
    n = 40
    a, b = torch.zeros(64), torch.zeros(64)
    opts = {}
    if which == "global_oob":
        a, b = emu.guarded(torch.zeros(n)), emu.guarded(torch.zeros(n))
    elif which in ("assert", "div_zero"):
        a = torch.tensor([1] * 31 + [-1 if which == "assert" else 0], dtype=torch.int32)
        b = torch.zeros(32, dtype=torch.int32)
    elif which == "spin":
        a, b = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        opts = dict(schedule="forward", timeout_s=0.3)
    elif which == "smem_oob":
        n = 64
    elif which == "stack_overflow":
        n = 1000
    with emu.options(**opts):
        with pytest.raises(EmulatorError, match=BAD[which]):
            L.call("ltk_emu_toy_bad", which.encode(), ptr(a), ptr(b), n)
    # the emulator is usable again afterwards
    x = torch.randn(2, 70)
    torch.testing.assert_close(_row_sum(L, x, 128), x.sum(1))


def test_static_shared_is_registered_for_poisoning(L):
    names = [n for n, _ in L.static_shared]
    assert any(n.startswith("toy::block_sum<float, 256>") and n.endswith("::partial") for n in names)
