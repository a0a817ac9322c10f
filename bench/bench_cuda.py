#!/usr/bin/env python
"""CUDA benchmark of the fused losses: fused vs eager reference vs ``torch.compile(reference)``.

The LDAM, GCL and CE cases of bench/bench_losses.py (the same modules and constructor defaults: fused
``ltkernels.losses``, eager ``ltkernels.reference`` -- ``F.cross_entropy`` for CE --, and
``torch.compile(eager, dynamic=False)``) at N x C = 128x100, 256x1000, 512x8142 and 8192x100000, fp32 and
bf16 inputs (no autocast), one forward+backward step each: ``x.grad = None; crit(x, t).backward()``.

* Timing: CUDA events around every step, no synchronisation between steps (a launch-bound step is timed at
  the rate the GPU receives work), one ``torch.cuda.synchronize()`` before reading them; warm-up steps
  first (compiles included), the median step is reported. The compile time is recorded, not timed.
* Peak memory: ``torch.cuda.max_memory_allocated()`` during one step minus what was allocated before it
  (inputs and module excluded, the produced ``x.grad`` included).
* % of HBM roofline: the bytes a fused forward+backward must move (read the N x C input, write the N x C
  gradient, in the input dtype; targets and per-class vectors are negligible) at the GPU's peak bandwidth
  (datasheet value by device name, else the measured device-to-device copy bandwidth), over the fused time.
* GCL noise: fused draws it in-kernel; eager and compiled draw it as the official code does (CPU
  ``Normal(0, 1/3)``, part of their cost, as in bench_losses.py), except above ``--gcl-eager-noise-limit``
  elements, where that CPU draw alone takes seconds: there they get the same N(0, 1/3) drawn on the device
  (noted in the row).
* Agreement: per row, fused vs the eager reference evaluated in float32 on the same input values (GCL: one
  injected noise draw for both), loss and gradient, with bench_losses.py's test_agree tolerances. A
  disagreement makes the exit status 1.
* Budget (``--budget S``): rows are measured target shapes first (512x8142, then 8192x100000 bf16); a row
  is not started after S seconds and a compile is skipped when it would not fit. By default compiles are
  skipped at 8192x100000 (``--compile-max-elems``): they would take the budget of tools/gpu_check.sh.

``--tiny``: one small shape on the CPU, ``time.perf_counter`` timing, no compile, no peak memory -- the same
code path, so that python_tests/test_gpu_check.py can run it without a GPU.

Writes ``OUT/bench_cuda.md`` and ``OUT/bench_cuda.json`` after every row (a run cut short keeps the rows it
finished) and prints one progress line per row. Exit status: 0, or 1 when an impl raised or a row
disagreed, 2 when no CUDA device is visible. The targets are reported, not asserted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # ltkernels is built in place (tools/build.sh, tools/gpu_check.sh)
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.bench_losses import CASES, TORCH_DTYPES, build, caller  # noqa: E402

SHAPES: list[tuple[int, int]] = [(128, 100), (256, 1000), (512, 8142), (8192, 100000)]
TINY_SHAPES: list[tuple[int, int]] = [(64, 50)]
DTYPES: tuple[str, ...] = ("fp32", "bf16")
LOSSES: tuple[str, ...] = ("LDAM", "GCL", "CE")
IMPLS: tuple[str, ...] = ("fused", "eager", "compiled")

# Peak HBM bandwidth (bytes/s): (substrings the device name must contain, substrings it must not).
PEAK_BANDWIDTH: list[tuple[tuple[str, ...], tuple[str, ...], float]] = [
    (("H200",), (), 4.8e12),
    (("H100",), ("PCIE", "NVL"), 3.35e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (("A100", "80GB"), ("PCIE",), 2.039e12),  # SXM4
]

ROOFLINE_TARGET = ((8192, 100000), "bf16", 70.0)  # fused fwd+bwd >= 70 % of the HBM roofline
SPEEDUP_TARGET = ((512, 8142), {"eager": 5.0, "compiled": 2.0})  # fused >= 5x eager, >= 2x compiled

# test_agree's tolerances (bench_losses.py): (loss, gradient relative to the largest |gradient|)
AGREE_TOL = {"fp32": (1e-4, 1e-4), "bf16": (1e-2, 3e-2)}

MD_COLUMNS = ["loss", "shape", "dtype", "fused µs", "eager µs", "compiled µs", "× eager", "× compiled",
              "% roofline", "peak MiB fused / eager / compiled", "agree (loss / grad err)", "notes"]


# ----------------------------------------------------------------------------------------------------------
# device, timing, memory
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Backend:
    """The device a step runs on, with its timing, synchronisation and peak-memory probe."""

    device: torch.device

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def timer(self) -> str:
        return "cuda-events" if self.is_cuda else "perf_counter"

    def sync(self) -> None:
        """Wait for queued device work (a no-op on the CPU)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def time_calls(self, fn: Callable[[], Any], n: int) -> list[float]:
        """Seconds of each of ``n`` back-to-back calls of ``fn``."""
        if not self.is_cuda:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            return out
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) * 1e-3 for start, end in events]

    def peak_extra_bytes(self, fn: Callable[[], Any]) -> tuple[Any, Optional[int]]:
        """``fn()`` and the peak bytes it allocated beyond what was allocated before (None on the CPU)."""
        if not self.is_cuda:
            return fn(), None
        self.sync()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = fn()
        self.sync()
        return out, torch.cuda.max_memory_allocated(self.device) - base

    def free_memory(self) -> None:
        """Return cached blocks between rows (eager at 8192x100000 needs tens of GiB)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()


def table_bandwidth(name: str) -> Optional[float]:
    """The datasheet HBM bandwidth of a GPU called ``name`` (PEAK_BANDWIDTH), None if not listed."""
    up = name.upper()
    for need, avoid, bw in PEAK_BANDWIDTH:
        if all(s in up for s in need) and not any(s in up for s in avoid):
            return bw
    return None


def device_info(backend: Backend) -> dict[str, Any]:
    """Versions, device, and the bandwidth of the roofline with its source."""
    info: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "python": platform.python_version(), "device": str(backend.device),
                            "timer": backend.timer}
    if backend.is_cuda:
        props = torch.cuda.get_device_properties(backend.device)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info["device_name"] = platform.processor() or platform.machine()
    # device-to-device copy (read + write), median of 10
    src = torch.ones((256 if backend.is_cuda else 16) << 20, device=backend.device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    backend.sync()
    info["measured_copy_bandwidth"] = 2 * src.nbytes / statistics.median(backend.time_calls(lambda: dst.copy_(src), 10))
    del src, dst
    peak = table_bandwidth(info["device_name"]) if backend.is_cuda else None
    if peak is not None:
        info["bandwidth"], info["bandwidth_source"] = peak, "datasheet peak HBM bandwidth"
    else:
        info["bandwidth"], info["bandwidth_source"] = info["measured_copy_bandwidth"], "measured copy bandwidth"
    return info


# ----------------------------------------------------------------------------------------------------------
# one row: (loss, shape, dtype)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Options:
    """What to run and the timing and budget knobs."""

    shapes: list[tuple[int, int]]
    dtypes: list[str]
    losses: list[str]
    compile: bool
    compile_max_elems: int = 100_000_000
    gcl_eager_noise_limit: int = 100_000_000
    warmup: int = 3
    min_time: float = 0.2  # seconds of timed steps per impl (about)
    min_repeats: int = 5
    max_repeats: int = 200
    budget: Optional[float] = None  # seconds for the whole run
    compile_reserve: float = 30.0  # seconds assumed for a compile before one has been measured


@dataclass
class Measurement:
    """One impl of one row: the median step time and its spread, peak memory, or why it is missing."""

    us: Optional[float] = None
    us_min: Optional[float] = None
    repeats: Optional[int] = None
    peak_bytes: Optional[int] = None
    first_call_s: Optional[float] = None  # includes the compile for ``compiled``
    skipped: Optional[str] = None
    error: Optional[str] = None

    def cell(self) -> str:
        return "error" if self.error else "skipped" if self.skipped else f"{self.us:.1f}"


@dataclass
class Row:
    """One (loss, shape, dtype) with its impls, the agreement check and the derived columns."""

    loss: str
    N: int
    C: int
    dtype: str
    impls: dict[str, Measurement] = field(default_factory=dict)
    agree: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> str:
        return f"{self.N}x{self.C}"

    def speedup(self, other: str) -> Optional[float]:
        """``other``'s step time over fused's."""
        f, o = self.impls.get("fused"), self.impls.get(other)
        if f is None or o is None or f.us is None or o.us is None:
            return None
        return o.us / f.us

    def roofline_pct(self, bandwidth: float) -> Optional[float]:
        """The time to read the input and write the gradient at ``bandwidth``, in % of the fused step."""
        f = self.impls.get("fused")
        if f is None or f.us is None:
            return None
        nbytes = 2 * self.N * self.C * TORCH_DTYPES[self.dtype].itemsize
        return 100.0 * nbytes / bandwidth / (f.us * 1e-6)

    def notes_cell(self) -> str:
        """The row's notes, each impl's error or skip reason and the agreement check's error, for Markdown."""
        notes = self.notes + [f"{k}: {m.error or m.skipped}" for k, m in self.impls.items() if m.error or m.skipped]
        if "error" in self.agree:
            notes.append(f"agreement check: {self.agree['error']}")
        return "; ".join(notes).replace("|", "\\|")

    def peak_mib_cell(self) -> str:
        """Each impl's peak MiB, " / "-separated."""
        return " / ".join(_fmt(None if m.peak_bytes is None else m.peak_bytes / 2**20, ".0f")
                          for m in self.impls.values())

    def as_dict(self, bandwidth: float) -> dict[str, Any]:
        impls = {k: {a: v for a, v in m.__dict__.items() if v is not None} for k, m in self.impls.items()}
        return {"loss": self.loss, "shape": [self.N, self.C], "dtype": self.dtype, **impls,
                "speedup_vs_eager": self.speedup("eager"), "speedup_vs_compiled": self.speedup("compiled"),
                "roofline_pct": self.roofline_pct(bandwidth), "agree": self.agree, "notes": self.notes}


def make_inputs(loss: str, N: int, C: int, dtype: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """bench_losses.py's input distributions -- cosines U(-1, 1) or logits N(0, 2) -- and uniform targets,
    drawn in place on the device (8192x100000 fp32 is 3 GiB: no host copy, no temporaries), seeded."""
    g = torch.Generator(device=device).manual_seed(1234 + N + C)
    x = torch.empty(N, C, dtype=TORCH_DTYPES[dtype], device=device)
    if CASES[loss].kind == "cos":
        x.uniform_(-1.0, 1.0, generator=g)
    else:
        x.normal_(0.0, 2.0, generator=g)
    t = torch.randint(0, C, (N,), device=device, generator=g)
    return x.requires_grad_(True), t


def gcl_noise(x: torch.Tensor) -> torch.Tensor:
    """GCL's raw N(0, 1/3) draw for ``x``, on ``x``'s device."""
    return torch.randn(x.shape, device=x.device, dtype=x.dtype).mul_(1.0 / 3.0)


def make_step(call: Callable, x: torch.Tensor, t: torch.Tensor, device_noise: bool) -> Callable[[], torch.Tensor]:
    """One forward+backward step into ``x.grad`` (reset to None first, as ``zero_grad()`` does);
    ``device_noise``: GCL's noise drawn on the device and injected."""

    def step() -> torch.Tensor:
        x.grad = None
        loss = call(x, t, None, gcl_noise(x) if device_noise else None)
        loss.backward()
        return loss

    return step


def measure(step: Callable[[], torch.Tensor], backend: Backend, opts: Options, warmup: int) -> Measurement:
    """First call (compile), warm-up, one step for the peak memory, then about ``opts.min_time`` seconds
    of timed steps (a step slower than that is timed once)."""
    m = Measurement()
    t0 = time.perf_counter()
    step()
    backend.sync()
    m.first_call_s = time.perf_counter() - t0
    for _ in range(warmup - 1 if m.first_call_s < opts.min_time else 0):
        step()
    t0 = time.perf_counter()
    _, m.peak_bytes = backend.peak_extra_bytes(step)
    backend.sync()
    est = time.perf_counter() - t0
    # at least min_repeats calls, so that the median means something even for a call slower than min_time
    n = max(opts.min_repeats, min(opts.max_repeats, math.ceil(opts.min_time / max(est, 1e-9))))
    times = backend.time_calls(step, n)
    m.us, m.us_min, m.repeats = statistics.median(times) * 1e6, min(times) * 1e6, n
    return m


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def run_impl(row: Row, impl: str, x: torch.Tensor, t: torch.Tensor, backend: Backend, opts: Options) -> Measurement:
    """Build and measure one impl of ``row``; an exception (out of memory, a failed compile) becomes the
    measurement's error, so that the other impls and rows still run."""
    device_noise = CASES[row.loss].noise and impl != "fused" and row.N * row.C > opts.gcl_eager_noise_limit
    try:
        mod = build(CASES[row.loss], impl, row.C).to(backend.device)  # ("compiled": a fresh dynamo cache)
        step = make_step(caller(CASES[row.loss], mod), x, t, device_noise)
        return measure(step, backend, opts, max(opts.warmup, 3) if impl == "compiled" else opts.warmup)
    except Exception as exc:  # noqa: BLE001  (reported in the row; the run goes on)
        return Measurement(error=_error(exc))
    finally:
        x.grad = None
        if impl == "compiled":
            torch._dynamo.reset()
        backend.free_memory()


def agreement(row: Row, x: torch.Tensor, t: torch.Tensor, backend: Backend) -> dict[str, Any]:
    """Fused (in the row's dtype) vs the eager reference in float32 on the same input values, GCL with one
    injected noise draw: the loss error relative to max(1, |loss|), the largest gradient error relative to
    the largest |gradient|, and whether both are within AGREE_TOL."""
    case = CASES[row.loss]
    try:
        noise = gcl_noise(x.detach()) if case.noise else None
        out = []
        for impl, dtype in (("fused", x.dtype), ("eager", torch.float32)):
            xs = x.detach().to(dtype).requires_grad_(True)
            call = caller(case, build(case, impl, row.C).to(backend.device))
            loss = call(xs, t, None, None if noise is None else noise.to(dtype))
            loss.backward()
            out.append((float(loss.detach().float()), xs.grad.float()))
            del xs, loss
        (lf, gf), (le, ge) = out
        loss_err = abs(lf - le) / max(1.0, abs(le))
        grad_err = float((gf - ge).abs().max()) / (float(ge.abs().max()) or 1.0)
        tol_loss, tol_grad = AGREE_TOL[row.dtype]
        return {"fused_loss": lf, "reference_loss": le, "loss_err": loss_err, "grad_err": grad_err,
                "ok": bool(loss_err <= tol_loss and grad_err <= tol_grad)}
    except Exception as exc:  # noqa: BLE001
        return {"error": _error(exc), "ok": False}
    finally:
        backend.free_memory()


def compile_skip_reason(row: Row, opts: Options, started: float, compile_cost: list[float]) -> Optional[str]:
    """Why the compiled impl of ``row`` is not run, or None."""
    if not opts.compile:
        return "compile off (--no-compile, or --tiny without --compile)"
    if opts.compile_max_elems and row.N * row.C > opts.compile_max_elems:
        return "not compiled at this size (time budget; --compile-max-elems 0 includes it)"
    if opts.budget is not None:
        expected = max(compile_cost) if compile_cost else opts.compile_reserve
        if time.perf_counter() - started + expected > opts.budget:
            return "not compiled (--budget nearly spent)"
    return None


def run_row(loss: str, shape: tuple[int, int], dtype: str, backend: Backend, opts: Options, started: float,
            compile_cost: list[float]) -> Row:
    """Measure every impl of one (loss, shape, dtype) and check fused against the reference."""
    row = Row(loss, *shape, dtype)
    x, t = make_inputs(loss, *shape, dtype, backend.device)
    for impl in IMPLS:
        reason = compile_skip_reason(row, opts, started, compile_cost) if impl == "compiled" else None
        row.impls[impl] = Measurement(skipped=reason) if reason else run_impl(row, impl, x, t, backend, opts)
        if impl == "compiled" and row.impls[impl].first_call_s is not None:
            compile_cost.append(row.impls[impl].first_call_s)
    row.agree = agreement(row, x, t, backend)
    if CASES[loss].noise:
        row.notes.append("eager/compiled noise drawn on the device" if row.N * row.C > opts.gcl_eager_noise_limit
                         else "eager/compiled draw the official CPU noise")
    return row


def run_order(opts: Options) -> list[tuple[str, tuple[int, int], str]]:
    """(loss, shape, dtype) in the order measured: the speedup target's shape, then the roofline target's
    shape and dtype, then the rest in the given order -- a run cut short still has the targets."""
    def priority(combo: tuple[str, tuple[int, int], str]) -> int:
        _, shape, dtype = combo
        if shape == SPEEDUP_TARGET[0]:
            return 0
        return 1 if (shape, dtype) == ROOFLINE_TARGET[:2] else 2
    return sorted(((loss, s, d) for s in opts.shapes for d in opts.dtypes for loss in opts.losses), key=priority)


# ----------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------


def targets(rows: list[Row], bandwidth: float) -> list[dict[str, Any]]:
    """Each target that a measured row addresses, with the value (None: not measured) and whether it is met."""
    out = []
    shape, dtype, pct = ROOFLINE_TARGET
    for r in rows:
        if ((r.N, r.C), r.dtype) == (shape, dtype):
            v = r.roofline_pct(bandwidth)
            out.append({"target": f"{r.loss} {r.shape} {dtype} fused fwd+bwd >= {pct:g}% of HBM roofline",
                        "value": v, "unit": "%", "met": None if v is None else v >= pct})
    shape, need = SPEEDUP_TARGET
    for r in rows:
        if (r.N, r.C) == shape:
            for other, x in need.items():
                v = r.speedup(other)
                out.append({"target": f"{r.loss} {r.shape} {r.dtype} fused >= {x:g}x {other}",
                            "value": v, "unit": "×", "met": None if v is None else v >= x})
    return out


def _fmt(v: Optional[float], spec: str, suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def _target_line(t: dict[str, Any]) -> str:
    if t["value"] is None:
        return f"{t['target']}: not measured"
    return f"{t['target']}: {t['value']:.2f}{t['unit']} {'met' if t['met'] else 'NOT met'}"


def _agree_cell(a: dict[str, Any]) -> str:
    if "error" in a:
        return "error"
    return f"{'ok' if a['ok'] else 'FAIL'} ({a['loss_err']:.0e} / {a['grad_err']:.0e})"


def markdown(rows: list[Row], info: dict[str, Any], tgts: list[dict[str, Any]], left_out: int) -> str:
    """The report: machine, method, one table row per (loss, shape, dtype), the targets."""
    bw = info["bandwidth"]
    cap = f", sm_{info['capability'].replace('.', '')}" if "capability" in info else ""
    lines = ["# bench_cuda", "",
             f"Device: {info['device_name']} ({info['device']}{cap}); torch {info['torch']} (CUDA "
             f"{info['torch_cuda']}); timer: {info['timer']}.", "",
             f"Roofline bandwidth: {bw / 1e12:.3f} TB/s, {info['bandwidth_source']} (measured device copy: "
             f"{info['measured_copy_bandwidth'] / 1e12:.3f} TB/s).", "",
             "Times: median forward+backward step (µs). × eager, × compiled: their time ÷ fused time. "
             "% roofline: (read the N×C input + write the N×C gradient) ÷ bandwidth ÷ fused time. Peak MiB: "
             "max_memory_allocated during one step minus what was allocated before it. Agree: fused vs the "
             "eager reference in fp32 on the same inputs (loss error, largest gradient error ÷ largest |gradient|).",
             ""]
    if left_out:
        lines += [f"**Incomplete run**: {left_out} rows were not measured.", ""]
    lines += ["| " + " | ".join(MD_COLUMNS) + " |", "|" + "|".join(["---"] * 3 + ["--:"] * 7 + ["---"] * 2) + "|"]
    for r in rows:
        cells = [r.loss, r.shape, r.dtype, *(r.impls[k].cell() for k in IMPLS),
                 _fmt(r.speedup("eager"), ".2f", "×"), _fmt(r.speedup("compiled"), ".2f", "×"),
                 _fmt(r.roofline_pct(bw), ".1f", "%"), r.peak_mib_cell(), _agree_cell(r.agree), r.notes_cell()]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Targets (reported, not asserted):", ""]
    lines += [f"* {_target_line(t)}" for t in tgts] or ["* none measured in this run"]
    return "\n".join(lines) + "\n"


def write_outputs(out: str, rows: list[Row], info: dict[str, Any], opts: Options, left_out: int) -> None:
    """OUT/bench_cuda.md and OUT/bench_cuda.json, each replaced atomically; rows in table order."""
    rows = sorted(rows, key=lambda r: (opts.losses.index(r.loss), opts.shapes.index((r.N, r.C)),
                                       opts.dtypes.index(r.dtype)))
    tgts = targets(rows, info["bandwidth"])
    meta = {**info, "complete": left_out == 0, "rows_left_out": left_out, "shapes": [list(s) for s in opts.shapes],
            "dtypes": opts.dtypes, "losses": opts.losses, "compile": opts.compile,
            "compile_max_elems": opts.compile_max_elems, "budget_s": opts.budget}
    doc = {"meta": meta, "rows": [r.as_dict(info["bandwidth"]) for r in rows], "targets": tgts}
    write_files(out, "bench_cuda", markdown(rows, info, tgts, left_out), doc)


def write_files(out: str, stem: str, md: str, doc: dict[str, Any]) -> None:
    """OUT/STEM.md and OUT/STEM.json, each replaced atomically (a run cut short keeps a whole file)."""
    for name, text in ((stem + ".md", md), (stem + ".json", json.dumps(doc, indent=1) + "\n")):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def progress_line(i: int, n: int, row: Row, bandwidth: float, elapsed: float) -> str:
    """One line per finished row."""
    cells = "  ".join(f"{k} {row.impls[k].cell():>9}" for k in IMPLS)
    errs = [f"{k}: {m.error}" for k, m in row.impls.items() if m.error]
    if not row.agree.get("ok"):
        errs.append(f"agreement: {row.agree.get('error') or _agree_cell(row.agree)}")
    return (f"[{i:>2}/{n}] {row.loss:<4} {row.shape:>12} {row.dtype}  {cells}  x eager "
            f"{_fmt(row.speedup('eager'), '.2f')}  x compiled {_fmt(row.speedup('compiled'), '.2f')}  roofline "
            f"{_fmt(row.roofline_pct(bandwidth), '.1f', '%')}  (t={elapsed:.0f}s)"
            + ("  ERRORS: " + "; ".join(errs) if errs else ""))


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def _choices(text: str, known: tuple[str, ...], what: str, p: argparse.ArgumentParser) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in known]
    if bad or not names:
        p.error(f"--{what}: unknown {bad} (choose from {', '.join(known)})")
    return names


def parse_options(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, Options]:
    """The command line and the run's Options (--tiny: one small CPU shape, seconds in all)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for bench_cuda.md and bench_cuda.json")
    p.add_argument("--tiny", action="store_true", help="one small shape on the CPU, no compile (a smoke run)")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (default with --tiny)")
    p.add_argument("--shapes", default=None, help="NxC,... (default: 128x100,256x1000,512x8142,8192x100000)")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--no-compile", action="store_true", help="no torch.compile(reference)")
    p.add_argument("--compile", action="store_true", help="compile also with --tiny")
    p.add_argument("--compile-max-elems", type=int, default=100_000_000, help="no compile above this N*C (0: none)")
    p.add_argument("--gcl-eager-noise-limit", type=int, default=100_000_000,
                   help="above this N*C eager/compiled GCL get their noise drawn on the device")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (see the module doc)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed steps per impl (0.2; tiny 0.02)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (3; tiny 1)")
    a = p.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")] if a.shapes else None
    except ValueError:
        p.error(f"--shapes: cannot parse {a.shapes!r} (want NxC,NxC)")
    if shapes and any(len(s) != 2 for s in shapes):
        p.error(f"--shapes: cannot parse {a.shapes!r} (want NxC,NxC)")
    opts = Options(shapes=shapes or (TINY_SHAPES if a.tiny else SHAPES),
                   dtypes=_choices(a.dtypes, DTYPES, "dtypes", p), losses=_choices(a.losses, LOSSES, "losses", p),
                   compile=not a.no_compile and (a.compile or not a.tiny), compile_max_elems=a.compile_max_elems,
                   gcl_eager_noise_limit=a.gcl_eager_noise_limit, budget=a.budget)
    if a.tiny:
        opts.warmup, opts.min_time, opts.min_repeats, opts.max_repeats = 1, 0.02, 3, 50
    opts.warmup = opts.warmup if a.warmup is None else a.warmup
    opts.min_time = opts.min_time if a.min_time is None else a.min_time
    return a, opts


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; see the module doc for the exit status."""
    args, opts = parse_options(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_cuda: no CUDA device visible (--tiny or --device cpu runs on the CPU)", file=sys.stderr)
        return 2
    backend = Backend(torch.device(device))
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    info = device_info(backend)
    print(f"bench_cuda: {info['device_name']}, torch {info['torch']}, timer {info['timer']}, roofline "
          f"{info['bandwidth'] / 1e12:.3f} TB/s ({info['bandwidth_source']}; measured copy "
          f"{info['measured_copy_bandwidth'] / 1e12:.3f} TB/s)", flush=True)
    order = run_order(opts)
    rows: list[Row] = []
    compile_cost: list[float] = []
    write_outputs(args.out, rows, info, opts, left_out=len(order))
    try:
        for i, (loss, shape, dtype) in enumerate(order, 1):
            if opts.budget is not None and time.perf_counter() - started > opts.budget:
                print(f"bench_cuda: --budget {opts.budget:g}s spent, {len(order) - len(rows)} rows left out",
                      flush=True)
                break
            rows.append(run_row(loss, shape, dtype, backend, opts, started, compile_cost))
            print(progress_line(i, len(order), rows[-1], info["bandwidth"], time.perf_counter() - started), flush=True)
            write_outputs(args.out, rows, info, opts, left_out=len(order) - len(rows))
    except KeyboardInterrupt:  # tools/gpu_check.sh's timeout sends SIGINT: keep the finished rows
        print("bench_cuda: interrupted; writing the rows finished so far", flush=True)
    write_outputs(args.out, rows, info, opts, left_out=len(order) - len(rows))
    print("\nTargets (reported, not asserted):")
    for t in targets(rows, info["bandwidth"]):
        print(f"  {_target_line(t)}")
    print(f"\nwrote {os.path.join(args.out, 'bench_cuda.md')} and bench_cuda.json "
          f"({len(rows)}/{len(order)} rows, {time.perf_counter() - started:.0f}s)")
    return exit_status("bench_cuda", rows)


def exit_status(prog: str, rows: list) -> int:
    """1 (after one stderr line naming them) when an impl raised or a row disagreed, else 0."""
    failed = [f"{r.loss} {r.shape} {r.dtype} {k}" for r in rows for k, m in r.impls.items() if m.error]
    failed += [f"{r.loss} {r.shape} {r.dtype} agreement" for r in rows if not r.agree.get("ok")]
    if failed:
        print(f"{prog}: {len(failed)} failure(s): {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
