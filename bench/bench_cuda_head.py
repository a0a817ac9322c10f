#!/usr/bin/env python
"""CUDA benchmark of the cosine head with its loss: chunked head + loss vs fused head then loss vs eager.

For tools/gpu_check.sh, next to bench/bench_cuda.py (whose timing and memory machinery it uses: CUDA events,
median step, ``max_memory_allocated`` beyond what was allocated before the step). Cases (N, D, C) =
(512, 512, 8142) and the large-class shape (8192, 512, 100000), fp32 and bf16 features and weight (no
autocast), the LDAM (DRW class-balanced weights) and GCL (CIFAR stage 1: m = 0, s = 30, noise_mul = 0.5)
losses of bench/bench_cosine_head.py, one forward+backward step each into ``x.grad`` and ``W.grad``:

* ``chunked``  ``ltkernels.cosine_head_loss`` (row chunks: one chunk of logits at a time);
* ``fused``    ``ltkernels.cosine_logits`` then the fused loss on the full (N, C) logits;
* ``eager``    ``F.normalize(x, dim=1) @ F.normalize(W, dim=0)`` then the eager reference loss.

GCL's noise: the fused paths draw it in the kernel; eager gets the same N(0, 1/3) drawn on the device
(the official CPU draw would time the host). Agreement: chunked in the row's dtype vs eager in float32 on
the same values (GCL: one injected draw for both): the loss and both gradients, relative errors as in
bench_cuda.py, tolerances AGREE_TOL. Targets (reported, not asserted): at (8192, 512, 100000) the chunked
step's peak memory <= 10% of eager's.

``--tiny``: one small case on the CPU (perf_counter timing, no peak memory), the same code path, so that
python_tests/test_gpu_check.py runs it without a GPU. Writes ``OUT/bench_cuda_head.md`` and
``OUT/bench_cuda_head.json`` after every row. Exit status: 0; 1 when an impl raised or a row disagreed;
2 when no CUDA device is visible.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.bench_cosine_head import _eager_head, _loss_module  # noqa: E402
from bench.bench_cuda import (AGREE_TOL, Backend, Measurement, Options, Row, _error, _fmt, device_info,  # noqa: E402
                              exit_status, measure, write_files)
from bench.bench_losses import TORCH_DTYPES  # noqa: E402
from ltkernels.cosine import cosine_head_loss, cosine_logits  # noqa: E402

SHAPES: list[tuple[int, int, int]] = [(512, 512, 8142), (8192, 512, 100000)]
TINY_SHAPES: list[tuple[int, int, int]] = [(48, 16, 30)]
DTYPES: tuple[str, ...] = ("fp32", "bf16")
LOSSES: tuple[str, ...] = ("LDAM", "GCL")
IMPLS: tuple[str, ...] = ("chunked", "fused", "eager")
MEMORY_TARGET = ((8192, 512, 100000), 0.10)  # chunked peak <= 10% of eager's
MD_COLUMNS = ["loss", "N×D×C", "dtype", "chunked µs", "fused µs", "eager µs", "eager ÷ chunked",
              "peak MiB chunked / fused / eager", "chunked peak ÷ eager peak", "agree (loss / dx / dW err)", "notes"]


def loss_module(loss: str, C: int, fused: bool):
    """The loss of bench/bench_cosine_head.py's head + loss cases, fused (ltkernels.losses) or eager."""
    return _loss_module(f"head+{loss}", C, "fused" if fused else "eager")


@dataclass
class HeadRow(Row):
    """bench_cuda.py's row with the feature dimension D (the impls are IMPLS here)."""

    D: int = 0

    @property
    def shape(self) -> str:
        return f"{self.N}x{self.D}x{self.C}"

    def ratio(self, num: str, den: str, attr: str) -> Optional[float]:
        a, b = self.impls.get(num), self.impls.get(den)
        va, vb = (getattr(a, attr, None) if a else None), (getattr(b, attr, None) if b else None)
        return None if va is None or vb is None or vb == 0 else va / vb

    def as_dict(self, bandwidth: float = 0.0) -> dict[str, Any]:
        impls = {k: {a: v for a, v in m.__dict__.items() if v is not None} for k, m in self.impls.items()}
        return {"loss": self.loss, "shape": [self.N, self.D, self.C], "dtype": self.dtype, **impls,
                "eager_over_chunked": self.ratio("eager", "chunked", "us"),
                "peak_chunked_over_eager": self.ratio("chunked", "eager", "peak_bytes"),
                "agree": self.agree, "notes": self.notes}


def make_inputs(N: int, D: int, C: int, dtype: str, device: torch.device):
    """Features, a (D, C) weight (the official layout) and uniform targets, drawn on the device, seeded."""
    g = torch.Generator(device=device).manual_seed(4321 + N + D + C)
    dt = TORCH_DTYPES[dtype]
    x = torch.randn(N, D, device=device, generator=g).to(dt).requires_grad_(True)
    w = torch.randn(D, C, device=device, generator=g).to(dt).requires_grad_(True)
    t = torch.randint(0, C, (N,), device=device, generator=g)
    return x, w, t


def make_call(row: HeadRow, impl: str, device: torch.device) -> Callable:
    """``fn(x, w, t, noise=None) -> loss`` of one impl; ``noise`` (GCL's raw draw, the only loss given one)
    is injected when not None."""
    loss = loss_module(row.loss, row.C, fused=impl != "eager").to(device)
    if impl == "chunked":
        return lambda x, w, t, noise=None: cosine_head_loss(x, w, t, loss, noise=noise)
    head = cosine_logits if impl == "fused" else _eager_head
    return lambda x, w, t, noise=None: loss(head(x, w), t) if noise is None else loss(head(x, w), t, noise=noise)


def _noise(row: HeadRow, impl: str, x: torch.Tensor) -> Optional[torch.Tensor]:
    """GCL's raw N(0, 1/3) draw on the device for eager (the fused paths draw in the kernel)."""
    if row.loss != "GCL" or impl != "eager":
        return None
    return torch.randn(x.shape[0], row.C, device=x.device, dtype=x.dtype).mul_(1.0 / 3.0)


def run_impl(row: HeadRow, impl: str, x, w, t, backend: Backend, opts: Options) -> Measurement:
    try:
        call = make_call(row, impl, backend.device)

        def step() -> torch.Tensor:
            x.grad = w.grad = None
            out = call(x, w, t, _noise(row, impl, x))
            out.backward()
            return out

        return measure(step, backend, opts, opts.warmup)
    except Exception as exc:  # noqa: BLE001  (reported in the row; the run goes on)
        return Measurement(error=_error(exc))
    finally:
        x.grad = w.grad = None
        backend.free_memory()


def agreement(row: HeadRow, x, w, t, backend: Backend) -> dict[str, Any]:
    """Chunked (row dtype) vs eager (float32) on the same values: loss error relative to max(1, |loss|),
    each gradient's largest error relative to its largest magnitude."""
    try:
        noise = None
        if row.loss == "GCL":
            noise = torch.randn(row.N, row.C, device=backend.device).mul_(1.0 / 3.0)
        out = []
        for impl, dtype in (("chunked", x.dtype), ("eager", torch.float32)):
            xs = x.detach().to(dtype).requires_grad_(True)
            ws = w.detach().to(dtype).requires_grad_(True)
            loss = make_call(row, impl, backend.device)(xs, ws, t, None if noise is None else noise.to(dtype))
            loss.backward()
            out.append((float(loss.detach().float()), xs.grad.float(), ws.grad.float()))
            del xs, ws, loss
        (lc, gxc, gwc), (le, gxe, gwe) = out

        def rel(a, b):
            return float((a - b).abs().max()) / (float(b.abs().max()) or 1.0)

        loss_err, dx_err, dw_err = abs(lc - le) / max(1.0, abs(le)), rel(gxc, gxe), rel(gwc, gwe)
        tol_loss, tol_grad = AGREE_TOL[row.dtype]
        return {"chunked_loss": lc, "reference_loss": le, "loss_err": loss_err, "dx_err": dx_err, "dw_err": dw_err,
                "ok": bool(loss_err <= tol_loss and dx_err <= tol_grad and dw_err <= tol_grad)}
    except Exception as exc:  # noqa: BLE001
        return {"error": _error(exc), "ok": False}
    finally:
        backend.free_memory()


def run_row(loss: str, shape: tuple[int, int, int], dtype: str, backend: Backend, opts: Options) -> HeadRow:
    N, D, C = shape
    row = HeadRow(loss, N, C, dtype, D=D)
    x, w, t = make_inputs(*shape, dtype, backend.device)
    for impl in IMPLS:
        row.impls[impl] = run_impl(row, impl, x, w, t, backend, opts)
    row.agree = agreement(row, x, w, t, backend)
    if loss == "GCL":
        row.notes.append("eager's noise drawn on the device")
    return row


def targets(rows: list[HeadRow]) -> list[dict[str, Any]]:
    shape, limit = MEMORY_TARGET
    out = []
    for r in rows:
        if (r.N, r.D, r.C) == shape:
            v = r.ratio("chunked", "eager", "peak_bytes")
            out.append({"target": f"{r.loss} {r.shape} {r.dtype} chunked peak memory <= {limit:g} x eager's",
                        "value": v, "unit": "", "met": None if v is None else v <= limit})
    return out


def _agree_cell(a: dict[str, Any]) -> str:
    if "error" in a:
        return "error"
    return f"{'ok' if a['ok'] else 'FAIL'} ({a['loss_err']:.0e} / {a['dx_err']:.0e} / {a['dw_err']:.0e})"


def markdown(rows: list[HeadRow], info: dict[str, Any], tgts: list[dict[str, Any]], left_out: int) -> str:
    lines = ["# bench_cuda_head", "",
             f"Device: {info['device_name']} ({info['device']}); torch {info['torch']}; timer: {info['timer']}.", "",
             "Times: median forward+backward step (µs), features and weight gradients. chunked: "
             "cosine_head_loss; fused: cosine_logits then the fused loss; eager: F.normalize + mm + the "
             "reference loss. Peak MiB: max_memory_allocated during one step minus what was allocated before "
             "it. Agree: chunked vs eager in fp32 on the same inputs.", ""]
    if left_out:
        lines += [f"**Incomplete run**: {left_out} rows were not measured.", ""]
    lines += ["| " + " | ".join(MD_COLUMNS) + " |", "|" + "|".join(["---"] * 3 + ["--:"] * 6 + ["---"] * 2) + "|"]
    for r in rows:
        cells = [r.loss, r.shape, r.dtype, *(r.impls[k].cell() for k in IMPLS),
                 _fmt(r.ratio("eager", "chunked", "us"), ".2f", "×"), r.peak_mib_cell(),
                 _fmt(r.ratio("chunked", "eager", "peak_bytes"), ".3f"), _agree_cell(r.agree), r.notes_cell()]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Targets (reported, not asserted):", ""]
    lines += [f"* {t['target']}: " + ("not measured" if t["value"] is None else
                                      f"{t['value']:.3f} {'met' if t['met'] else 'NOT met'}") for t in tgts]
    if not tgts:
        lines.append("* none measured in this run")
    return "\n".join(lines) + "\n"


def write_outputs(out: str, rows: list[HeadRow], info: dict[str, Any], left_out: int) -> None:
    tgts = targets(rows)
    doc = {"meta": {**info, "complete": left_out == 0, "rows_left_out": left_out},
           "rows": [r.as_dict() for r in rows], "targets": tgts}
    write_files(out, "bench_cuda_head", markdown(rows, info, tgts, left_out), doc)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for bench_cuda_head.md and bench_cuda_head.json")
    p.add_argument("--tiny", action="store_true", help="one small case on the CPU (a smoke run)")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (default with --tiny)")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--budget", type=float, default=None, help="no row is started after this many seconds")
    a = p.parse_args(argv)
    dtypes = [d for d in a.dtypes.split(",") if d]
    losses = [s for s in a.losses.split(",") if s]
    bad = [d for d in dtypes if d not in DTYPES] + [s for s in losses if s not in LOSSES]
    if bad or not dtypes or not losses:
        p.error(f"unknown dtypes / losses {bad} (dtypes: {', '.join(DTYPES)}; losses: {', '.join(LOSSES)})")
    device = a.device or ("cpu" if a.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_cuda_head: no CUDA device visible (--tiny or --device cpu runs on the CPU)", file=sys.stderr)
        return 2
    backend = Backend(torch.device(device))
    opts = Options(shapes=[], dtypes=dtypes, losses=losses, compile=False)
    if a.tiny:
        opts.warmup, opts.min_time, opts.min_repeats, opts.max_repeats = 1, 0.02, 3, 50
    os.makedirs(a.out, exist_ok=True)
    started = time.perf_counter()
    info = device_info(backend)
    # the memory target's shape first: a run cut short by --budget still has it
    order = [(loss, s, d) for s in reversed(TINY_SHAPES if a.tiny else SHAPES) for d in dtypes for loss in losses]
    rows: list[HeadRow] = []
    write_outputs(a.out, rows, info, len(order))
    try:
        for i, (loss, shape, dtype) in enumerate(order, 1):
            if a.budget is not None and time.perf_counter() - started > a.budget:
                print(f"bench_cuda_head: --budget {a.budget:g}s spent, {len(order) - len(rows)} rows left out")
                break
            r = run_row(loss, shape, dtype, backend, opts)
            rows.append(r)
            cells = "  ".join(f"{k} {r.impls[k].cell():>9}" for k in IMPLS)
            print(f"[{i}/{len(order)}] {loss:<4} {r.shape:>16} {dtype}  {cells}  peak chunked/eager "
                  f"{_fmt(r.ratio('chunked', 'eager', 'peak_bytes'), '.3f')}  agree {_agree_cell(r.agree)}  "
                  f"(t={time.perf_counter() - started:.0f}s)", flush=True)
            write_outputs(a.out, rows, info, len(order) - len(rows))
    except KeyboardInterrupt:  # tools/gpu_check.sh's timeout sends SIGINT: keep the finished rows
        print("bench_cuda_head: interrupted; writing the rows finished so far", flush=True)
    write_outputs(a.out, rows, info, len(order) - len(rows))
    return exit_status("bench_cuda_head", rows)


if __name__ == "__main__":
    sys.exit(main())
