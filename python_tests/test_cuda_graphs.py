"""The fused losses under CUDA graph capture and without host synchronisation (CUDA only).

* GCL with in-kernel noise: without ``seed``/``noise`` the kernel takes the CUDA generator's Philox state
  (csrc/cuda/margin_ce_cuda.cu, take_generator_state). Under capture that state is a pair of device
  addresses that torch's graph fills on every replay with the generator's current (seed, offset) and then
  advances the offset by the graph's whole increment -- the same (seed, offset) sequence that eager calls
  draw from that generator state. So each replay draws fresh noise, and after ``torch.cuda.manual_seed(s)``
  replay k equals eager call k bit for bit (the kernel reduces in a fixed order: it is deterministic).
* LDAM (no randomness): a replay equals an eager call on the same input values, loss and gradient, bit for
  bit, also after new values are copied into the captured input.
* ``torch.cuda.set_sync_debug_mode("error")``: a steady-state fused forward+backward (LDAM-DRW with
  per-class weights, GCL, KPS) performs no host synchronisation.

tools/gpu_check.sh runs these on a GPU; without one they skip.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from conftest import requires_cuda

from ltkernels import losses as L
from ltkernels.priors import drw_weights

pytestmark = requires_cuda

# the stream kernel's three paths (csrc/cuda/margin_ce_stream.cuh): a row per warp, a row per block with its
# logits cached in shared memory, a row per block streamed twice from global memory
SHAPES = [(64, 100), (16, 5000), (4, 20000)]
DTYPES = [torch.float32, torch.bfloat16]
SEED = 1234


def _counts(C: int) -> list[int]:
    """Long-tailed class counts (imbalance 100, head class 1000)."""
    return [max(1, int(1000 * 100.0 ** (-j / (C - 1)))) for j in range(C)]


def _cosines(N: int, C: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.rand(N, C, device="cuda", generator=g) * 2 - 1).to(dtype)
    t = torch.randint(0, C, (N,), device="cuda", generator=g)
    return x, t


def _step(crit: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One training step's loss part: grads reset to None, forward, backward into ``x.grad``."""

    def step() -> torch.Tensor:
        x.grad = None
        loss = crit(x, t)
        loss.backward()
        return loss

    return step


def _capture(step: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``step`` captured in a CUDA graph after three warm-up calls on a side stream (lazy initialisation and
    the modules' cached per-class vectors happen outside the capture); returns the graph and its loss."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    return graph, loss


def _replay(graph: torch.cuda.CUDAGraph, loss: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    graph.replay()
    torch.cuda.synchronize()
    return loss.detach().clone(), grad.clone()


def _eager(step: Callable[[], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    loss = step()
    return loss.detach().clone(), x.grad.clone()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,C", SHAPES)
def test_gcl_graph_replays_draw_fresh_noise_and_equal_eager(N, C, dtype):
    crit = L.GCLLoss(_counts(C), s=30).cuda()
    x, t = _cosines(N, C, dtype, seed=1)
    xg = x.clone().requires_grad_(True)
    torch.cuda.manual_seed(SEED)
    graph, g_loss = _capture(_step(crit, xg, t))
    g_grad = xg.grad  # written by every replay

    torch.cuda.manual_seed(SEED)
    replays = [_replay(graph, g_loss, g_grad) for _ in range(2)]
    xe = x.clone().requires_grad_(True)
    torch.cuda.manual_seed(SEED)
    eager = [_eager(_step(crit, xe, t), xe) for _ in range(2)]

    (l1, d1), (l2, d2) = replays
    assert torch.isfinite(l1) and torch.isfinite(l2)
    assert not torch.equal(l1, l2) and not torch.equal(d1, d2), "two replays drew the same noise"
    for k, ((lr, dr), (le, de)) in enumerate(zip(replays, eager)):
        assert torch.equal(lr, le), f"replay {k}: loss {lr.item()!r} vs eager {le.item()!r}"
        assert torch.equal(dr, de), f"replay {k}: gradient differs from eager (max {(dr - de).abs().max().item()})"
    # the same seed replays the same sequence
    torch.cuda.manual_seed(SEED)
    l1b, d1b = _replay(graph, g_loss, g_grad)
    assert torch.equal(l1b, l1) and torch.equal(d1b, d1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,C", SHAPES)
def test_ldam_graph_replay_equals_eager_bitwise(N, C, dtype):
    crit = L.LDAMLoss(_counts(C), max_m=0.5, s=30).cuda()
    x1, t = _cosines(N, C, dtype, seed=2)
    x2, _ = _cosines(N, C, dtype, seed=3)
    xg = x1.clone().requires_grad_(True)
    graph, g_loss = _capture(_step(crit, xg, t))
    g_grad = xg.grad
    losses = []
    for x in (x1, x2):  # new values in the captured input: the replay recomputes from them
        with torch.no_grad():
            xg.copy_(x)
        lr, dr = _replay(graph, g_loss, g_grad)
        xe = x.clone().requires_grad_(True)
        le, de = _eager(_step(crit, xe, t), xe)
        assert torch.equal(lr, le), f"loss {lr.item()!r} vs eager {le.item()!r}"
        assert torch.equal(dr, de), f"gradient differs from eager (max {(dr - de).abs().max().item()})"
        losses.append(lr)
    assert not torch.equal(losses[0], losses[1]), "the two inputs gave the same loss"


def _sync_free_cases(C: int) -> dict[str, torch.nn.Module]:
    counts = _counts(C)
    weight = drw_weights(counts, epoch=200).to("cuda", torch.float32)  # DRW stage: per-class weights
    return {"ldam_drw": L.LDAMLoss(counts, max_m=0.5, s=30, weight=weight).cuda(),
            "gcl": L.GCLLoss(counts, s=30).cuda(),
            "kps": L.KPSLoss(counts, max_m=0.5, weighted=True, s=30).cuda()}


@pytest.mark.parametrize("case", ["ldam_drw", "gcl", "kps"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,C", SHAPES)
def test_fused_step_does_not_synchronise(N, C, dtype, case):
    crit = _sync_free_cases(C)[case]
    x, t = _cosines(N, C, dtype, seed=4)
    x.requires_grad_(True)
    step = _step(crit, x, t)
    step()  # first call: lazy initialisation and the cached per-class vectors (device-side conversions)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            loss = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item() and torch.isfinite(x.grad).all().item()
