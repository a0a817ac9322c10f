"""The emulator's sanitizer (csrc/emu/sanitizer_impl.h): racecheck, memcheck and initcheck must bite.

Every planted bug below leaves the kernel's *result* right, so the plain emulator (scheduler, poisoned
shared memory, guard pages) passes it: each test shows that (``sanitize=False``), that the sanitizer
fails the mutant with a message naming the kernel, the threads, the source lines and the address, and
that the correct kernel passes under the sanitizer with the same seeds and schedules. The mutants are the
toy kernels of python_tests/emu/toy_kernels.cuh built with LTK_TOY_MUTANT_RACE / _ACCUMULATE
(toy_mutant_san.cpp), the shifted grid-stride index (toy_mutant_shift.cpp) and the barrier mutants of
test_emulation.py. That every real kernel runs clean under the sanitizer is test_emulation_kernels.py
(the sanitizer is on by default there), and the real-kernel mutants are in emu/mutants.py.
"""
from __future__ import annotations

import ctypes
import os
import re

import pytest
import torch

import emu
from emu import EmulatorError, ptr

HERE = os.path.dirname(os.path.abspath(__file__))
TOY = os.path.join(HERE, "emu", "toy_kernels.cuh")
SCHEDULES = [("random", 0), ("random", 1), ("uniform", 2), ("warps", 3), ("forward", 0), ("reverse", 0)]


@pytest.fixture(scope="module")
def L(instrumented_emu):
    return instrumented_emu


@pytest.fixture(autouse=True)
def _default_options(L):
    emu.set_options(seed=0x5EED, schedule="random", timeout_s=60.0, sm_count=4, poison=True, shuffle_blocks=True,
                    clamp_grid=0, sanitize=True, model=False)
    yield
    emu.set_options(sanitize=True, model=False)


def toy_line(text: str) -> int:
    """Line number of the unique line of toy_kernels.cuh containing text (messages cite it)."""
    hits = [i + 1 for i, ln in enumerate(open(TOY).read().splitlines()) if text in ln]
    assert len(hits) == 1, (text, hits)
    return hits[0]


# ---- racecheck --------------------------------------------------------------------------------------------
def _histogram(L, x, prefix, blocks=3):
    hist = emu.guarded(torch.zeros(16, dtype=torch.int32), name="hist")
    L.call(prefix + "shared_histogram", ctypes.c_longlong(x.numel()), ptr(x, name="x"), ptr(hist), blocks)
    return hist


@pytest.mark.parametrize("schedule,seed", SCHEDULES)
def test_racecheck_shared_read_modify_write(L, schedule, seed):
    """A shared-memory histogram counted with `local[b] = local[b] + 1` instead of atomicAdd: two threads
    of a block update one bin between the same two barriers. The emulator runs each thread atomically up to
    its next synchronisation point, so the counts come out right; racecheck reports the two accesses."""
    x = torch.randint(0, 16, (1000,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    want = torch.bincount(x.long(), minlength=16).to(torch.int32)
    with emu.options(schedule=schedule, seed=seed):
        assert torch.equal(_histogram(L, x, "ltk_emu_toy_"), want)  # the correct kernel is clean
        with emu.options(sanitize=False):
            assert torch.equal(_histogram(L, x, "ltk_emu_toy_san_"), want)  # the mutant's result is right
        with pytest.raises(EmulatorError) as e:
            _histogram(L, x, "ltk_emu_toy_san_")
    msg = str(e.value)
    line = toy_line("local[b] = local[b] + 1;")
    assert "kernel void toy_mutant_san::shared_histogram_kernel<16>" in msg
    assert re.search(r"data race on shared memory `shared_histogram_kernel<16>::local` \(64 bytes\) at byte offset "
                     r"\d+ \(address 0x[0-9a-f]+\): ", msg), msg
    # both accesses: kind, thread, line
    two = re.findall(rf"(?:\d+-byte )?(read|write) by block \(\d+,0,0\) thread \((\d+),0,0\) \[warp \d+ lane \d+\] at "
                     rf"emu/toy_kernels.cuh:{line} ", msg)
    assert len(two) == 2 and two[0][1] != two[1][1] and "write" in (two[0][0], two[1][0]), msg
    assert "not ordered by a barrier, a warp collective or an atomic (racecheck)" in msg


def _sum_atomic(L, x, prefix, blocks):
    out = emu.guarded(torch.zeros(1), name="total")
    L.call(prefix + "sum_atomic_f32", ctypes.c_longlong(x.numel()), ptr(x), ptr(out), blocks)
    return out


@pytest.mark.parametrize("schedule,seed", SCHEDULES[:4])
def test_racecheck_global_read_modify_write_between_blocks(L, schedule, seed):
    """Each block adds its partial sum to the output with `*out += acc` instead of atomicAdd: blocks run one
    after another here, so the total is right; on a GPU they run concurrently and lose updates."""
    x = torch.randn(3000, generator=torch.Generator().manual_seed(seed))
    with emu.options(schedule=schedule, seed=seed):
        torch.testing.assert_close(_sum_atomic(L, x, "ltk_emu_toy_", 4)[0], x.sum(), rtol=1e-5, atol=1e-4)
        with emu.options(sanitize=False):
            torch.testing.assert_close(_sum_atomic(L, x, "ltk_emu_toy_san_", 4)[0], x.sum(), rtol=1e-5, atol=1e-4)
        with pytest.raises(EmulatorError) as e:
            _sum_atomic(L, x, "ltk_emu_toy_san_", 4)
    msg = str(e.value)
    line = toy_line("if (threadIdx.x == 0) *out += acc;")
    assert re.search(r"data race on guarded global buffer 'total' \(4 bytes\) at byte offset 0 \(address 0x[0-9a-f]+\): "
                     rf"write by block \((\d+),0,0\) thread \(0,0,0\) \[warp 0 lane 0\] at emu/toy_kernels.cuh:{line} .*"
                     rf"and 4-byte read by block \((?!\1)\d+,0,0\) thread \(0,0,0\) \[warp 0 lane 0\] at "
                     rf"emu/toy_kernels.cuh:{line} ", msg), msg


def test_racecheck_accepts_atomics_and_warp_collectives(L):
    """No false positives: shared and global atomics on one address, and lanes ordered by __syncwarp."""
    x = torch.randint(0, 16, (5000,), dtype=torch.int32)
    assert torch.equal(_histogram(L, x, "ltk_emu_toy_", blocks=4), torch.bincount(x.long(), minlength=16).int())
    xs = torch.randn(128)
    out = torch.full((128,), float("nan"))
    L.call("ltk_emu_toy_warp_broadcast", ptr(xs), ptr(out, init=False), 1, 128)
    assert torch.equal(out, xs[::32].repeat_interleave(32))


@pytest.mark.parametrize("schedule,seed", SCHEDULES)
def test_racecheck_lanes_without_syncwarp(L, schedule, seed):
    """Lane 0 publishes a value in shared memory and the other lanes of its warp read it with no
    __syncwarp in between: the read is unordered with the write (or, when a reader runs first, reads a
    slot nobody wrote)."""
    xs = torch.randn(128)
    out = torch.full((128,), float("nan"))
    with emu.options(schedule=schedule, seed=seed):
        with pytest.raises(EmulatorError) as e:
            L.call("ltk_emu_toy_san_warp_broadcast", ptr(xs), ptr(out, init=False), 1, 128)
    msg = str(e.value)
    line = toy_line("out[blockIdx.x * blockDim.x + threadIdx.x] = slot[warp];")
    assert re.search(r"(data race|uninitialised read).* shared memory `warp_broadcast_kernel::slot`", msg), msg
    assert f"emu/toy_kernels.cuh:{line}" in msg, msg


@pytest.mark.parametrize("schedule", ["reverse", "forward", "uniform"])
def test_sanitizer_catches_barrier_mutants_in_any_order(L, schedule):
    """The barrier mutants of test_emulation.py escape the plain emulator in some orders (reverse for the
    missing barrier before the reads, uniform for the missing barrier before the reuse); the sanitizer
    reports both in every order, naming the shared slots and the reading line."""
    x = torch.randn(4, 1000, dtype=torch.float64)
    with emu.options(schedule=schedule):
        out = emu.guarded(torch.full((4,), float("nan"), dtype=torch.float64))
        with pytest.raises(EmulatorError, match=r"(data race|uninitialised read).* shared memory "
                                                r"`block_sum<double, 256>::partial`.* at emu/toy_kernels.cuh:\d+"):
            L.call("ltk_emu_toy_nosync_row_sum_f64", ptr(x), ptr(out), 4, 1000, 256)
        out = emu.guarded(torch.full((12,), float("nan"), dtype=torch.float64))
        x6 = torch.randn(6, 3000, dtype=torch.float64)
        with pytest.raises(EmulatorError, match=r"data race on shared memory `block_sum<double, 256>::partial`"):
            L.call("ltk_emu_toy_reuse_row_stats_f64", ptr(x6), ptr(out), 6, 3000)


# ---- memcheck ---------------------------------------------------------------------------------------------
def test_memcheck_unguarded_buffer_read_past_the_end(L):
    """axpy with its grid-stride start shifted by one reads x[n] of a plain (unguarded) tensor: ordinary
    heap memory, so without the sanitizer nothing faults. memcheck knows the bounds of every buffer passed
    through emu.ptr and stops the read before it happens."""
    n = 1000
    x, y = torch.randn(n), torch.randn(n)
    y0 = y.clone()
    L.call("ltk_emu_toy_axpy_f32", ctypes.c_longlong(n), ctypes.c_float(2.0), ptr(x, name="x"), ptr(y, name="y"), 3)
    torch.testing.assert_close(y, 2 * x + y0)  # the correct kernel is clean
    with pytest.raises(EmulatorError) as e:
        L.call("ltk_emu_toy_shift_axpy_f32", ctypes.c_longlong(n), ctypes.c_float(2.0), ptr(x, name="x"),
               ptr(y, name="y"), 3)
    msg = str(e.value)
    line = toy_line("y[i] = a * x[i] + y[i];")
    assert "kernel void toy_mutant_shift::axpy_kernel<float>" in msg
    assert re.search(r"block \(\d+,0,0\) thread \(\d+,0,0\) \[warp \d+ lane \d+\]: out-of-bounds global memory access "
                     r"at byte offset 4000 of a buffer of 4000 bytes \('x'\): 4-byte read at address 0x[0-9a-f]+ at "
                     rf"emu/toy_kernels.cuh:{line} ", msg), msg


def test_memcheck_unregistered_memory(L):
    """An address in no buffer the host registered (here: a tensor passed without emu.ptr) is illegal."""
    x = torch.randn(4096)
    y = torch.zeros(4096)
    with pytest.raises(EmulatorError, match=r"(illegal memory access: 4-byte read at address 0x[0-9a-f]+ at "
                                            r"emu/toy_kernels.cuh:\d+ .*is in no buffer the kernel received"
                                            r"|out-of-bounds global memory access)"):
        L.call("ltk_emu_toy_axpy_f32", ctypes.c_longlong(4096), ctypes.c_float(1.0),
               ctypes.c_void_p(x.data_ptr()), ptr(y), 3)


# ---- initcheck --------------------------------------------------------------------------------------------
def test_initcheck_accumulating_into_an_uninitialised_output(L):
    """row_sum storing `out[row] += acc` is right only when the host zeroed the output. Registered as
    uninitialised (init=False, like torch.empty on a GPU; guarded all-NaN outputs count as such too), the
    first read of out[row] is reported; the correct kernel never reads its output."""
    x = torch.randn(3, 300)
    out = torch.zeros(3)
    L.call("ltk_emu_toy_san_row_sum_f32", ptr(x), ptr(out), 3, 300, 128)  # zeroed by the host: right
    torch.testing.assert_close(out, x.sum(1))
    out = torch.zeros(3)
    L.call("ltk_emu_toy_row_sum_f32", ptr(x), ptr(out, init=False, name="out"), 3, 300, 128)  # correct: clean
    torch.testing.assert_close(out, x.sum(1))
    for out, init in ((torch.zeros(3), False), (emu.guarded(torch.full((3,), float("nan")), name="out"), None)):
        with pytest.raises(EmulatorError) as e:
            L.call("ltk_emu_toy_san_row_sum_f32", ptr(x), ptr(out, init=init is not False, name="out"), 3, 300, 128)
        msg = str(e.value)
        line = toy_line("if (threadIdx.x == 0) out[row] += acc;")
        assert re.search(r"block \(\d,0,0\) thread \(0,0,0\) \[warp 0 lane 0\]: uninitialised read: 4-byte read of "
                         r"(guarded )?global buffer 'out' \(12 bytes\) at byte offset \d \(address 0x[0-9a-f]+\), which "
                         rf"neither the host nor a kernel has written, at emu/toy_kernels.cuh:{line} .*\(initcheck; the buffer was "
                         r"registered as unwritten: init=False, or a guarded tensor that was all NaN",
                         msg), msg


def test_initcheck_output_written_by_an_earlier_launch(L):
    """Written bytes stay initialised across launches (a workspace filled by one kernel and read by the
    next): the column-vector tangent reads the column dots that its first launch wrote."""
    rows, cols = 5, 40
    x, gm = torch.randn(rows, cols), torch.randn(rows, cols)
    gm0 = gm.clone()
    norm = x.norm(dim=0)
    ws = emu.guarded(torch.full((cols,), float("nan")), name="workspace")  # all NaN: counts as unwritten
    L.call("ltk_emu_cosine_tangent_f32", ctypes.c_longlong(rows), ctypes.c_longlong(cols), ptr(gm), ptr(x), 0,
           ptr(norm), ctypes.c_double(1e-6), 0, ptr(None), ptr(ws))
    torch.testing.assert_close(ws, (x * gm0).sum(0), rtol=1e-5, atol=1e-5)


def test_sanitizer_off_and_on_give_the_same_results(L):
    """The hooks only observe: the same kernel gives the same bits with the sanitizer on and off."""
    x = torch.randn(5, 777, dtype=torch.float64)
    outs = []
    for on in (True, False):
        with emu.options(sanitize=on):
            out = torch.zeros(5, dtype=torch.float64)
            L.call("ltk_emu_toy_row_sum_f64", ptr(x), ptr(out), 5, 777, 256)
            outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_sanitizer_sees_every_cuda_kernel(L):
    """Guards against a detector that silently sees nothing (device code in a translation unit built
    without the instrumentation, the sanitizer switched off by the environment): one small launch of every
    kernel in csrc/cuda (test_emulation_kernels' coverage run) checks global and shared accesses."""
    import test_emulation_kernels as K

    emu.clear_launches()
    K.test_registered_kernels_really_launch(L)
    launches = emu.launches()
    for k in K.KERNEL_COVERAGE:
        recs = [r for r in launches if re.search(rf"::{k}\b", r["kernel"])]
        assert recs and all(r["checked"] > 0 for r in recs), (k, recs)
    with emu.options(sanitize=False):
        emu.clear_launches()
        K.test_registered_kernels_really_launch(L)
        assert all(r["checked"] == 0 for r in emu.launches())



def test_overlapping_views_are_one_buffer(L):
    """Overlapping views of one tensor registered for one call become one region (their union), so that
    a byte has one shadow cell whichever view reached it."""
    base = torch.randn(1000)
    n0 = L.ltk_emu_buffer_count()
    ptr(base[0:600])
    ptr(base[400:1000])
    ptr(base[100:200])
    assert L.ltk_emu_buffer_count() == n0 + 1
    L.ltk_emu_buffer_clear_transient()
    assert L.ltk_emu_buffer_count() == n0


def test_racecheck_aliasing_arguments(L):
    """axpy with y overlapping x (x = base[0:600], y = base[400:1000]): thread i writes base[400 + i],
    which thread i + 400 reads as x[i + 400] with nothing ordering them (the kernel's __restrict__ promise
    is broken). On a GPU the result depends on timing; racecheck reports it."""
    base = torch.randn(1000)
    with pytest.raises(EmulatorError, match=r"data race on global buffer \(4000 bytes\) at byte offset \d+ .* "
                                            r"at emu/toy_kernels.cuh:\d+ .*not ordered"):
        L.call("ltk_emu_toy_axpy_f32", ctypes.c_longlong(600), ctypes.c_float(0.5), ptr(base[0:600]),
               ptr(base[400:1000]), 3)
