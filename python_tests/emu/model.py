"""Memory-access model of the emulated CUDA kernels: figures from the sanitizer's trace (csrc/emu/sanitizer_impl.h).

For every launch recorded under ``emu.options(model=True)`` the emulator reports, per instruction and
buffer, the warp-level requests it reconstructed (the k-th execution of an instruction by the lanes of a
warp between two synchronisation points), their active lanes, access width, the bytes the lanes asked
for, the 32-byte sectors those bytes lie in (global memory) and the shared-memory wavefronts (the largest
number of distinct 4-byte words one bank serves). From those:

* sector efficiency = bytes used / (32 x sectors): 100 % when a warp's loads cover whole sectors (e.g. 32
  lanes x 4 consecutive bytes), 25 % when each lane's 4 bytes sit 16 bytes apart;
* bank-conflict degree = wavefronts / the fewest wavefronts the bytes need (1 = conflict-free);
* per kernel: bytes moved per element = 32 x all global sectors / elements, and passes over the input =
  bytes the lanes read from it / its size (2 for a kernel that reads every element twice).

The model counts L1-level requests: no caches, no timing, no DRAM (docs/emulator.md, "Memory-access
model"). ``tools/cuda_model_report.py`` writes bench/results/cuda_model.md from ``margin_ce_figures`` and
``kernel_summaries``; ``python_tests/test_emulation_model.py`` holds the thresholds.
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch

import emu

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def efficiency(sites: list[dict], *, region: str | None = None, op: str | None = "read") -> float:
    """Sector efficiency of the global requests of ``sites`` (optionally one region / one op)."""
    used = sectors = 0
    for s in sites:
        if (region is None or s["region"] == region) and (op is None or s["op"] == op) and s["sectors"]:
            used += s["bytes_used"]
            sectors += s["sectors"]
    return used / (32 * sectors) if sectors else float("nan")


def lanes_per_request(sites: list[dict], *, region: str | None = None, op: str | None = "read") -> float:
    req = lanes = 0
    for s in sites:
        if (region is None or s["region"] == region) and (op is None or s["op"] == op):
            req += s["requests"]
            lanes += s["lanes"]
    return lanes / req if req else float("nan")


def bank_conflict_degree(sites: list[dict], *, region: str | None = None, op: str | None = None) -> float:
    """Wavefronts / minimal wavefronts over the shared-memory requests (1.0: conflict-free)."""
    wf = mn = 0
    for s in sites:
        if (region is None or s["region"] == region) and (op is None or s["op"] == op) and s["min_wavefronts"]:
            wf += s["wavefronts"]
            mn += s["min_wavefronts"]
    return wf / mn if mn else float("nan")


def merge(launches: list[dict]) -> dict:
    """The launches of one kernel (e.g. of several calls) as one: sites and regions summed."""
    sites: dict[tuple, dict] = {}
    regions: dict[str, dict] = {}
    for L in launches:
        for s in L["sites"]:
            k = (s["region"], s["site"], s["op"])
            if k not in sites:
                sites[k] = dict(s)
            else:
                for f in ("requests", "lanes", "bytes_used", "sectors", "wavefronts", "min_wavefronts"):
                    sites[k][f] += s[f]
                sites[k]["width"] = max(sites[k]["width"], s["width"])
        for r in L["regions"]:
            if r["name"] not in regions:
                regions[r["name"]] = dict(r)
            else:
                for f in ("requests", "read_sectors", "write_sectors", "read_used", "write_used"):
                    regions[r["name"]][f] += r[f]
    return {"kernel": launches[0]["kernel"], "sites": list(sites.values()), "regions": list(regions.values())}


# ---- the fused loss (margin_ce) --------------------------------------------------------------------------
MARGIN_CE_FEATURES = ("scale", "margin", "weight")  # LDAM-DRW: per-class margin and class weights


def run_margin_ce(dtype: torch.dtype, N: int, C: int, features=MARGIN_CE_FEATURES, lib=None) -> dict:
    """One emulated margin_ce forward (loss and gradient) with the model on; returns the row kernel's launch record, the
    buffers named input, target, grad, row_loss, weight, margin, ... as in MarginCeArgs. The sanitizer
    checks the same launch (outputs are registered as unwritten)."""
    import test_emulation_kernels as K

    L = lib or emu.lib()
    x, t, kw = K.margin_ce_case(N, C, dtype, features=features)
    p = K._prepare(x, t, kw)
    keep = []

    def G(v, name, init=True):
        # plain torch allocations (64-byte aligned, like cudaMalloc's 256 for the purpose of 32-byte
        # sectors; guarded buffers end at a page, so their start alignment depends on their size)
        if v is None:
            return None
        g = v.contiguous().clone()
        keep.append(g)
        return emu.ptr(g, init=init, name=name).value

    acc = K._acc(dtype)
    none = kw["reduction"] == 0
    outputs = dict(
        row_loss=G(torch.empty(N, dtype=acc), "row_loss", init=False),
        grad=G(torch.empty(N, C, dtype=dtype), "grad", init=False),
        grad_row_shift=G(torch.empty(N, dtype=acc), "grad_row_shift", init=False) if p["row_shift"] is not None
        else None,
        loss_out=G(torch.empty(N if none else 1, dtype=dtype), "loss_out", init=False),
        scalars=G(torch.empty(L.ltk_emu_margin_ce_scalars_bytes(K.DTYPE_CODE[dtype]), dtype=torch.uint8), "scalars",
                  init=False))
    f = K.flat_margin_ce(L, x, t, kw, p, G, outputs)
    emu.model_launches()  # drop anything recorded before
    with emu.options(model=True):
        L.call("ltk_emu_margin_ce", K.DTYPE_CODE[dtype], ctypes.byref(f))
    launches = emu.model_launches()
    # the prologue (one block: the call's scalars), then the row kernel, which the figures are about
    assert len(launches) == 2 and "margin_ce_prologue_kernel" in launches[0]["kernel"], launches
    return launches[1]


def margin_ce_figures(dtype: torch.dtype, N: int, C: int, features=MARGIN_CE_FEATURES) -> dict:
    """The report's row for one margin_ce shape."""
    rec = run_margin_ce(dtype, N, C, features)
    sites = rec["sites"]
    regions = {r["name"]: r for r in rec["regions"]}
    inp = regions["input"]
    elems = N * C
    glob = [r for r in rec["regions"] if r["space"] == "global"]
    moved = 32 * sum(r["read_sectors"] + r["write_sectors"] for r in glob)
    input_sites = [s for s in sites if s["region"] == "input"]
    return {
        "dtype": str(dtype).replace("torch.", ""), "N": N, "C": C, "block": rec["block"][0],
        "input_efficiency": efficiency(sites, region="input"),
        "grad_efficiency": efficiency(sites, region="grad", op="write"),
        "global_efficiency": (sum(r["read_used"] + r["write_used"] for r in glob) / moved) if moved else float("nan"),
        "input_lanes": lanes_per_request(sites, region="input"),
        "input_width": max((s["width"] for s in input_sites), default=0),
        "input_requests_per_row": sum(s["requests"] for s in input_sites) / N,
        "bytes_per_element": moved / elems,
        "input_passes": inp["read_used"] / inp["bytes"],
        "shared_conflict": bank_conflict_degree(sites),
        "sites": sites,
    }


# ---- every other kernel, at one representative shape -------------------------------------------------------
def kernel_summaries() -> list[dict]:
    """Per kernel of csrc/cuda (and the toy transpose) at one shape: global load / store sector efficiency,
    lanes per request and the shared-memory bank-conflict degree."""
    L = emu.lib()
    ptr = emu.ptr
    out = []
    emu.model_launches()
    g = torch.Generator().manual_seed(0)
    rows, cols = 64, 300
    a = torch.randn(rows, cols, generator=g, dtype=torch.float32)
    with emu.options(model=True):
        for vec_rows in (1, 0):
            o = torch.empty(rows if vec_rows else cols)
            L.call("ltk_emu_cosine_vec_dot_f32", ctypes.c_longlong(rows), ctypes.c_longlong(cols), ptr(a), ptr(a),
                   vec_rows, 1, ptr(o, init=False))
            gm, norm = torch.randn(rows, cols, generator=g), a.norm(dim=1 if vec_rows else 0)
            ws = torch.empty(cols)
            L.call("ltk_emu_cosine_tangent_f32", ctypes.c_longlong(rows), ctypes.c_longlong(cols), ptr(gm), ptr(a),
                   vec_rows, ptr(norm), ctypes.c_double(1e-6), 0, ptr(None), ptr(ws, init=False))
        dst = torch.empty(rows, cols)
        rn, cn = torch.rand(rows) + 0.5, torch.rand(cols) + 0.5
        L.call("ltk_emu_cosine_scale_f32", ctypes.c_longlong(rows), ctypes.c_longlong(cols), ptr(a),
               ctypes.c_longlong(cols), ctypes.c_longlong(1), ptr(rn), ptr(cn), ctypes.c_double(1e-6),
               ptr(dst, init=False))
        bi, bk = 64, 300
        gram = torch.rand(bi, bk, generator=g) * 2 - 1
        nI, nK = torch.ones(bi), torch.ones(bk)
        fbuf = torch.empty(bi, bk)
        L.call("ltk_emu_uniformity_pair_transform_f32", ctypes.c_longlong(bi), ctypes.c_longlong(bk), ptr(gram),
               ptr(fbuf, init=False), ptr(nI), ptr(nK), 0, 1, ctypes.c_double(1.0), ctypes.c_double(1e-12))
        prow, pcol = torch.empty(bi, bk), torch.empty(bi, bk)
        L.call("ltk_emu_uniformity_exp_shift_f32", ctypes.c_longlong(bi), ctypes.c_longlong(bk), ptr(fbuf),
               ptr(nI), ptr(nK), ptr(prow, init=False), ptr(pcol, init=False))
    by_kernel: dict[str, list] = {}
    for rec in emu.model_launches():
        by_kernel.setdefault(rec["kernel"], []).append(rec)
    for name, recs in by_kernel.items():
        m = merge(recs)
        s = m["sites"]
        out.append({"kernel": name, "load_efficiency": efficiency(s, op="read"),
                    "store_efficiency": efficiency(s, op="write"), "load_lanes": lanes_per_request(s, op="read"),
                    "shared_conflict": bank_conflict_degree(s)})
    return out
