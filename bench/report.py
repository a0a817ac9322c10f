"""Run the benchmark suites and write bench/results/results.md (Markdown tables) and results.png.

    python -m bench.report                      # full run: every suite in bench/, std sizes, fp32+bf16,
                                                # fused vs eager vs torch.compile(reference)
    python -m bench.report --no-compile         # skip the torch.compile cases (inductor is slow on 2 cores)
    python -m bench.report --sizes 512x8142 -k "LDAM or GCL"
    python -m bench.report --json bench/results/raw/bench-*.json   # only re-render saved results

The run is ``python -m pytest bench --benchmark-json=bench/results/raw/bench-<stamp>.json ...`` (so
suites written by others, e.g. bench/bench_cosine_head.py, are included); the tables are built from
that JSON. Benchmarks that follow the ``extra_info`` convention of bench/conftest.py (``suite``,
``case``, ``shape``, ``dtype``, ``mode``, ``impl``) are pivoted by impl; any other benchmark is listed
as is. Times are the per-step median (``--stat``) of pytest-benchmark's rounds.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time
from collections import OrderedDict, defaultdict
from pathlib import Path

from ltkernels._readme import replace_marked_block

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
RAW = RESULTS / "raw"
README_START = "<!-- bench-table:start -->"
README_END = "<!-- bench-table:end -->"

# Targets the report marks (bench/targets.json says what each one means).
_TARGETS = json.loads((BENCH / "targets.json").read_text())
# (case, shape) -> (min speedup vs eager, min speedup vs compiled or None)
TARGETS = {(case, shape): tuple(v) for case, shapes in _TARGETS["speedups"].items() for shape, v in shapes.items()}
MIN_SPEEDUP_AT = _TARGETS["min_speedup_at"]  # every case of the loss suite at this shape: no slower than eager
HEAD_GEMMS_MAX = _TARGETS["head"]["gemms_max"]
HEAD_MEMORY_SHAPE, HEAD_MEMORY_FRACTION = _TARGETS["head"]["memory_shape"], _TARGETS["head"]["memory_fraction"]
HEAD_LOW_PRECISION_SHAPE = _TARGETS["head"]["low_precision_shape"]
HEAD_LOW_PRECISION_MAX = _TARGETS["head"]["low_precision_vs_fp32_max"]

IMPL_ORDER = ["fused", "eager", "compiled"]
USE_INTERLEAVED = True  # speedups from the interleaved measurement when a suite records one
NOISY = 0.3  # cores used by other processes during a case above which it is flagged
MODE_ORDER = ["fwd+bwd", "fwd"]
DTYPE_ORDER = ["fp32", "bf16", "fp16", "fp64"]


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

def run_suites(args, nodeids=None, tag="", extra=()) -> tuple[Path, float, int]:
    """One pytest process over ``nodeids`` (default: all of bench/); returns (json, wall s, exit code)."""
    RAW.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RAW / f"bench-{stamp}{tag}.json"
    targets = list(nodeids) if nodeids else [str(BENCH.relative_to(ROOT))]
    single_tests = bool(nodeids) and all("::" in n for n in nodeids)
    cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={out}", f"--benchmark-max-time={args.max_time}",
           f"--benchmark-min-rounds={args.min_rounds}", "--benchmark-quiet",
           "--continue-on-collection-errors",  # one broken suite must not cost the others' results
           f"--bench-sizes={args.sizes}", f"--bench-dtypes={args.dtypes}",
           f"--bench-interleave-time={args.interleave_time}",
           "--bench-compile" if args.compile else "--bench-no-compile"]
    if args.threads:
        cmd += [f"--bench-threads={args.threads}"]
    if args.k and not single_tests:
        cmd += ["-k", args.k]
    if not args.agree or single_tests:
        cmd += ["--benchmark-only"]
    cmd += list(extra) + args.pytest_args
    shown = cmd if len(cmd) < 40 else cmd[:4] + [f"<{len(targets)} test ids>"] + cmd[4 + len(targets):]
    print("+", " ".join(shown), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=ROOT)
    wall = time.time() - t0
    print(f"  {tag.lstrip('-') or 'run'}: {wall / 60:.1f} min, pytest exit code {rc}", flush=True)
    return out, wall, rc


def plan_chunks(args) -> list[tuple[str, list[str], list[str]]]:
    """(label, pytest targets, extra options): one pytest process per suite file, and one per loss
    for bench_losses.py, so that a crash (e.g. the extension rebuilt in place under a running
    process) costs one chunk, which is retried, and not the whole run."""
    chunks = []
    for f in sorted(BENCH.glob("bench_*.py")):
        rel = str(f.relative_to(ROOT))
        if f.name == "bench_losses.py":
            sys.path.insert(0, str(ROOT))
            try:
                from bench.bench_losses import CASES
            finally:
                sys.path.pop(0)
            for case in CASES:
                chunks.append((f"losses-{case}", [rel], [f"--bench-cases={case}"]))
        else:
            chunks.append((f.stem.replace("bench_", ""), [rel], []))
    return chunks


def run_chunked(args) -> tuple[list[Path], float, int]:
    paths, rc_all, t0 = [], 0, time.time()
    chunks = plan_chunks(args)
    for i, (label, targets, extra) in enumerate(chunks):
        print(f"[{i + 1}/{len(chunks)}] {label}", flush=True)
        for attempt in range(2):
            out, _, rc = run_suites(args, nodeids=targets, tag=f"-{label}", extra=extra)
            if rc == 5 or (out.exists() and rc >= 0):  # 5: -k selected nothing in this chunk
                break
            print(f"  {label}: no results (exit code {rc}); " + ("retrying" if attempt == 0 else "giving up"),
                  flush=True)
        if out.exists():
            paths.append(out)
        if rc not in (0, 5):  # 5: nothing selected (e.g. -k excludes the whole chunk)
            rc_all = rc_all or rc
    return paths, time.time() - t0, rc_all


# ----------------------------------------------------------------------------------------------
# Loading and pivoting
# ----------------------------------------------------------------------------------------------

def load(paths: list[Path], later_wins: bool = False) -> tuple[list[dict], dict]:
    """Benchmarks of several JSON files. A case in more than one file: the measurement taken with less load
    from other processes (re-runs of noisy cases), or with ``later_wins`` the later file's (re-measurement
    after a code change)."""
    benches: "OrderedDict[str, dict]" = OrderedDict()
    machine: dict = {}
    for p in paths:
        with open(p) as fh:
            data = json.load(fh)
        mi = dict(data.get("machine_info", {}) or {})
        lt_new = dict(mi.get("ltkernels") or {})
        lt_old = machine.get("ltkernels") or {}
        if lt_old:  # several files: load at the start of the first, wall time summed
            lt_new["loadavg_start"] = lt_old.get("loadavg_start", lt_new.get("loadavg_start"))
            lt_new["wall_s"] = (lt_old.get("wall_s") or 0) + (lt_new.get("wall_s") or 0)
            for k in ("sizes", "dtypes"):  # the merged table covers the union
                merged = list(lt_old.get(k) or [])
                merged += [v for v in (lt_new.get(k) or []) if v not in merged]
                lt_new[k] = merged
        if lt_new:
            mi["ltkernels"] = lt_new
        machine = dict(mi or machine, _commit=data.get("commit_info", {}), _datetime=data.get("datetime"))
        for b in data.get("benchmarks", []):
            key = b.get("fullname") or b["name"]
            old = benches.get(key)
            if not later_wins and old is not None and _load_of(old) is not None and _load_of(b) is not None \
                    and _load_of(old) <= _load_of(b):
                continue  # keep the measurement taken with less load from other processes
            benches[key] = b  # otherwise later files win
    return list(benches.values()), machine


def _load_of(b: dict):
    return (b.get("extra_info") or {}).get("other_load")


def noisy_benchmarks(paths: list[Path], threshold: float) -> list[str]:
    benches, _ = load(paths)
    return [b["fullname"] for b in benches if b.get("fullname") and (_load_of(b) or 0.0) > threshold]


def wait_quiet(threshold: float, timeout: float) -> float:
    """Wait (up to ``timeout`` s) until other processes use less than ``threshold`` cores over 2 s."""
    sys.path.insert(0, str(ROOT))
    try:
        from bench.conftest import CpuMeter
    finally:
        sys.path.pop(0)
    t_end = time.monotonic() + timeout
    while True:
        m = CpuMeter()
        time.sleep(2.0)
        load = m.others()
        if load is None or load < threshold or time.monotonic() >= t_end:
            return load or 0.0


def _shape_key(shape: str):
    try:
        dims = [int(v) for v in shape.split("x")]
    except ValueError:
        return (math.inf, [], shape)
    return (math.prod(dims), dims, shape)


def _order(value, order):
    return order.index(value) if value in order else len(order)


def pivot(benches: list[dict], stat: str):
    """-> {suite: {(case, shape, dtype, mode): {impl: {"t": s, "mem": bytes, "nc": bytes}}}}, others."""
    suites: dict = defaultdict(lambda: defaultdict(dict))
    others = []
    case_order: dict = defaultdict(list)
    for b in benches:
        ei = b.get("extra_info") or {}
        if not all(k in ei for k in ("case", "shape", "dtype", "mode", "impl")):
            others.append(b)
            continue
        suite = ei.get("suite") or Path(b.get("fullname", "").split("::")[0]).stem
        key = (ei["case"], ei["shape"], ei["dtype"], ei["mode"])
        suites[suite][key][ei["impl"]] = {"t": b["stats"][stat], "mem": ei.get("peak_mem_bytes"),
                                          "nc": ei.get("nc_bytes"), "rounds": b["stats"].get("rounds"),
                                          "inter": ei.get("vs_fused_interleaved") if USE_INTERLEAVED else None,
                                          "load": ei.get("other_load"), "vs_3_gemms": ei.get("vs_3_gemms"),
                                          "mm_autograd_vs_3_gemms": ei.get("mm_autograd_vs_3_gemms"),
                                          "vs_fp32": ei.get("vs_fp32"),
                                          # suites that time the pair from the fused step record "other / fused"
                                          # there, as vs_<other>_interleaved (bench_regularisers.py)
                                          "inter_vs": {k[3:-len("_interleaved")]: v for k, v in ei.items()
                                                       if k.startswith("vs_") and k.endswith("_interleaved")
                                                       and k != "vs_fused_interleaved"}}
        if ei["case"] not in case_order[suite]:
            case_order[suite].append(ei["case"])
    return suites, others, case_order


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------

def fmt_ms(t):
    if t is None:
        return "—"
    ms = t * 1e3
    return f"{ms:.3f}" if ms < 1 else (f"{ms:.2f}" if ms < 100 else f"{ms:.0f}")


def fmt_x(r):
    if r is None:
        return "—"
    return f"{r:.1f}×" if r < 100 else f"{r:.0f}×"


def fmt_mem(m, nc):
    if m is None:
        return "—"
    mib = m / 2**20
    s = f"{mib:.2f}" if mib < 10 else f"{mib:.1f}"
    if nc:
        s += f" ({m / nc:.1f})"
    return s


def _ratio(a, b):
    if a is None or b is None or a <= 0:
        return None
    return b / a


def speedup(d: dict, other: str):
    """other impl's time / fused time: the interleaved ratio if recorded, else the ratio of the stats."""
    o = d.get(other, {})
    if o.get("inter"):
        return o["inter"]
    from_fused = d.get("fused", {}).get("inter_vs", {}).get(other) if USE_INTERLEAVED else None
    if from_fused:
        return from_fused
    return _ratio(d.get("fused", {}).get("t"), o.get("t"))


def row_load(d: dict):
    loads = [v.get("load") for v in d.values() if v.get("load") is not None]
    return max(loads) if loads else None


def fmt_load(v):
    if v is None:
        return "—"
    return f"{v:.1f}" + (" ⚠" if v > NOISY else "")


def target_cell(case, shape, dtype, mode, r_eager, r_comp):
    tgt = TARGETS.get((case, shape))
    if tgt is None and shape in MIN_SPEEDUP_AT:
        tgt = (MIN_SPEEDUP_AT[shape], None)
    if tgt is None or dtype != "fp32" or mode != "fwd+bwd":
        return ""
    te, tc = tgt
    ok = r_eager is not None and r_eager >= te
    parts = [f"≥{te:g}× eager {'✓' if ok else '✗'}"]
    if tc is not None:
        okc = r_comp is not None and r_comp >= tc
        parts.append(f"≥{tc:g}× compiled {'✓' if okc else ('✗' if r_comp is not None else '(not run)')}")
    return ", ".join(parts)


def loss_tables(rows: dict, case_order: list[str]) -> tuple[list[str], list[list[str]]]:
    """Markdown sections for the fused/eager/compiled suite; also the target rows."""
    lines: list[str] = []
    target_rows: list[list[str]] = []
    keys = sorted(rows, key=lambda k: (_order(k[3], MODE_ORDER), _order(k[2], DTYPE_ORDER), _shape_key(k[1]),
                                       _order(k[0], case_order)))
    header = ("| case | shape | dtype | fused ms | eager ms | compiled ms | fused vs eager | "
              "fused vs compiled | peak MiB fused | peak MiB eager | peak MiB compiled | target | other load |")
    sep = "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|"
    section = None
    for k in keys:
        case, shape, dtype, mode = k
        if (mode, dtype) != section:
            section = (mode, dtype)
            title = "forward + backward" if mode == "fwd+bwd" else ("forward only" if mode == "fwd" else mode)
            lines += ["", f"### {title}, {dtype}", "", header, sep]
        d = rows[k]
        tf, te, tc = (d.get(i, {}).get("t") for i in IMPL_ORDER)
        r_e, r_c = speedup(d, "eager"), speedup(d, "compiled")
        tgt = target_cell(case, shape, dtype, mode, r_e, r_c)
        mems = [fmt_mem(d.get(i, {}).get("mem"), d.get(i, {}).get("nc")) for i in IMPL_ORDER]
        load = fmt_load(row_load(d))
        row = [case, shape, dtype, fmt_ms(tf), fmt_ms(te), fmt_ms(tc), fmt_x(r_e), fmt_x(r_c), *mems, tgt, load]
        lines.append("| " + " | ".join(row) + " |")
        if tgt:
            target_rows.append([case, shape, fmt_ms(tf), fmt_ms(te), fmt_ms(tc), fmt_x(r_e), fmt_x(r_c), tgt, load])
    return lines, target_rows


def head_target_rows(rows: dict) -> list[list[str]]:
    """Target rows of the cosine-head suite: [what, shape, measured, target]."""
    out = []
    for (case, shape, dtype, mode), d in sorted(rows.items(), key=lambda kv: _shape_key(kv[0][1])):
        fused, gemms = d.get("fused", {}), d.get("gemms", {})
        if case == "head" and dtype != "fp32":
            r = fused.get("vs_fp32")
            if shape == HEAD_LOW_PRECISION_SHAPE and r is not None:
                out.append([f"head fwd+bwd {dtype} ÷ fp32", shape, f"{r:.3f}× ({fmt_ms(fused.get('t'))} ms in {dtype})",
                            f"<{HEAD_LOW_PRECISION_MAX:g}× {'✓' if r < HEAD_LOW_PRECISION_MAX else '✗'}"])
            continue
        if case == "head" and fused.get("vs_3_gemms") is not None:
            r = fused["vs_3_gemms"]
            floor = fused.get("mm_autograd_vs_3_gemms")
            floor_note = f"; torch.mm alone with autograd: {floor:.3f}×" if floor is not None else ""
            out.append(["head fwd+bwd ÷ its 3 GEMMs", shape, f"{r:.3f}× ({fmt_ms(fused.get('t'))} ms vs "
                        f"{fmt_ms(gemms.get('t'))} ms{floor_note})",
                        f"≤{HEAD_GEMMS_MAX:g}× {'✓' if r <= HEAD_GEMMS_MAX else '✗'}"])
        chunked, eager = d.get("chunked", {}), d.get("eager", {})
        if shape == HEAD_MEMORY_SHAPE and chunked.get("mem") and eager.get("mem"):
            f = chunked["mem"] / eager["mem"]
            out.append([f"{case} peak memory, chunked ÷ eager", shape,
                        f"{f:.3f} ({chunked['mem'] / 2**20:.0f} MiB vs {eager['mem'] / 2**20:.0f} MiB)",
                        f"≤{HEAD_MEMORY_FRACTION:g} {'✓' if f <= HEAD_MEMORY_FRACTION else '✗'}"])
    return out


def generic_suite_table(name: str, rows: dict, case_order: list[str]) -> list[str]:
    impls: list[str] = []
    for d in rows.values():
        for i in d:
            if i not in impls:
                impls.append(i)
    impls.sort(key=lambda i: _order(i, IMPL_ORDER))
    base = "fused" if "fused" in impls else impls[0]
    others = [i for i in impls if i != base]
    head = (["case", "shape", "dtype", "mode"] + [f"{i} ms" for i in impls]
            + [f"{i} / {base}" for i in others] + [f"peak MiB {i}" for i in impls] + ["other load"])
    lines = ["", f"### suite `{name}`", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * 4 + "--:|" * (len(head) - 4)]
    keys = sorted(rows, key=lambda k: (_order(k[3], MODE_ORDER), _order(k[2], DTYPE_ORDER), _shape_key(k[1]),
                                       _order(k[0], case_order)))
    for k in keys:
        d = rows[k]
        t = {i: d.get(i, {}).get("t") for i in impls}
        cells = list(k) + [fmt_ms(t[i]) for i in impls]
        cells += [fmt_x(d[i]["inter"] if base == "fused" and d.get(i, {}).get("inter") else _ratio(t[base], t[i]))
                  for i in others]
        cells += [fmt_mem(d.get(i, {}).get("mem"), d.get(i, {}).get("nc")) for i in impls]
        cells.append(fmt_load(row_load(d)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def other_table(benches: list[dict], stat: str) -> list[str]:
    lines = ["", "### other benchmarks", "", "| benchmark | group | min ms | median ms | rounds |",
             "|---|---|--:|--:|--:|"]
    for b in sorted(benches, key=lambda b: (b.get("group") or "", b["name"])):
        s = b["stats"]
        lines.append(f"| {b['name']} | {b.get('group') or ''} | {fmt_ms(s['min'])} | {fmt_ms(s['median'])} | "
                     f"{s.get('rounds', '')} |")
    return lines


def machine_lines(machine: dict, wall: float | None) -> list[str]:
    lt = machine.get("ltkernels", {})
    cpu = lt.get("cpu_model") or (machine.get("cpu") or {}).get("brand_raw") or machine.get("processor", "?")
    commit = machine.get("_commit", {}) or {}
    la0, la1 = lt.get("loadavg_start"), lt.get("loadavg_end")
    out = [f"- CPU: {cpu}, {lt.get('cpu_count', machine.get('cpu', {}).get('count', '?'))} cores "
           f"(torch threads: {lt.get('torch_threads', '?')}), `torch.ops.ltkernels.cpu_isa()` = "
           f"`{lt.get('cpu_isa', '?')}`",
           f"- torch {lt.get('torch', '?')}, Python {lt.get('python', machine.get('python_version', '?'))}, "
           f"{machine.get('system', '')} {machine.get('release', '')}".rstrip(),
           f"- commit {commit.get('id', '?')[:12]}{' (uncommitted changes)' if commit.get('dirty') else ''}, "
           f"run finished {machine.get('_datetime', '?')}"]
    if la0 or la1:
        f = lambda la: "/".join(f"{v:.2f}" for v in la) if la else "?"  # noqa: E731
        out.append(f"- load average (1/5/15 min) at start {f(la0)}, at end {f(la1)} "
                   "(the cores are shared: a load above the core count means other jobs were running)")
    w = wall if wall is not None else lt.get("wall_s")
    if w:
        what = "benchmark run wall time" if wall is not None else "pytest wall time (summed over the merged runs)"
        out.append(f"- {what}: {w / 60:.1f} min "
                   f"(sizes {','.join(lt.get('sizes', [])) or '?'}, dtypes {','.join(lt.get('dtypes', [])) or '?'}, "
                   f"compile {'on (' + str(lt.get('compile_backend')) + ')' if lt.get('compile') else 'off'})")
    return out


def render_markdown(benches, machine, stat, wall=None, png_name="results.png"):
    suites, others, case_order = pivot(benches, stat)
    lines = ["# ltkernels benchmark results", "",
             "Generated by `python -m bench.report` (bench/README.md). Times: per-step "
             f"{stat} over pytest-benchmark rounds, in ms. Speedup = other impl's time / fused time"
             + (", measured interleaved (the fused step and the other step timed in alternating rounds, "
                "min of each; robust to load drift on the shared cores), so it can differ from the ratio "
                "of the ms columns, which come from separate runs. " if USE_INTERLEAVED else ". ") +
             "Peak MiB: peak extra memory of one step (torch.profiler allocation events), "
             "in parentheses the same in units of one N×C buffer of the input dtype. Other load: cores "
             "used by other processes while the row's cases were timed (max over its impls; /proc/stat "
             f"minus this process), ⚠ above {NOISY}: those timings are disturbed.", ""]
    lines += machine_lines(machine, wall)
    target_rows: list = []
    head_rows: list = []
    body: list[str] = []
    for suite in sorted(suites, key=lambda s: (s != "losses", s)):
        rows = suites[suite]
        impls = {i for d in rows.values() for i in d}
        if impls <= set(IMPL_ORDER) and "fused" in impls:
            if suite != "losses":
                body += ["", f"## suite `{suite}`"]
            sec, trg = loss_tables(rows, case_order[suite])
            body += sec
            target_rows += trg
        else:
            body += generic_suite_table(suite, rows, case_order[suite])
            head_rows += head_target_rows(rows)
    if others:
        body += other_table(others, stat)
    if target_rows:
        lines += ["", "## Performance targets (fp32, forward + backward)", "",
                  "| case | shape | fused ms | eager ms | compiled ms | fused vs eager | fused vs compiled | target | "
                  "other load |",
                  "|---|---|--:|--:|--:|--:|--:|---|--:|"]
        lines += ["| " + " | ".join(r) + " |" for r in target_rows]
    lines += head_table(head_rows)
    lines += ["", f"![speedups]({png_name})", "", "## All cases"] + body
    return "\n".join(lines) + "\n", suites, (target_rows, head_rows)


def plot(suites, path: Path, case_order) -> bool:
    rows = suites.get("losses")
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODE_ORDER if any(k[3] == m for k in rows)]
    dtypes = [d for d in DTYPE_ORDER if any(k[2] == d for k in rows)]
    shapes = sorted({k[1] for k in rows}, key=_shape_key)
    cases = [c for c in case_order["losses"]]
    against = [i for i in ("eager", "compiled") if any(i in d for d in rows.values())]
    panels = [(m, a) for m in modes for a in against]
    fig, axes = plt.subplots(len(panels), len(dtypes), figsize=(7.5 * len(dtypes), 3.6 * len(panels)),
                             squeeze=False)
    width = 0.8 / max(1, len(shapes))
    colors = plt.get_cmap("viridis")([0.15 + 0.7 * i / max(1, len(shapes) - 1) for i in range(len(shapes))])
    for r, (mode, other) in enumerate(panels):
        for c, dtype in enumerate(dtypes):
            ax = axes[r][c]
            lo = hi = 1.0
            for si, shape in enumerate(shapes):
                vals = []
                for case in cases:
                    d = rows.get((case, shape, dtype, mode), {})
                    ratio = speedup(d, other)
                    vals.append(ratio if ratio is not None else float("nan"))
                xs = [i + (si - (len(shapes) - 1) / 2) * width for i in range(len(cases))]
                ax.bar(xs, vals, width, label=shape, color=colors[si])
                for xv, v in zip(xs, vals):
                    if v == v:  # not NaN
                        ax.text(xv, v, f"{v:.1f}" if v < 10 else f"{v:.0f}", ha="center", va="bottom",
                                fontsize=5.5, rotation=90)
                finite = [v for v in vals if v == v and v > 0]
                lo, hi = min([lo] + finite), max([hi] + finite)
            ax.axhline(1.0, color="black", lw=0.8)
            if mode == "fwd+bwd" and dtype == "fp32":
                ax.axhline(10.0, color="tab:red", lw=0.8, ls="--", label="10× target (512×8142)")
                ax.axhline(5.0, color="tab:orange", lw=0.8, ls=":", label="5× target (256×1000)")
            ax.set_yscale("log")
            ax.set_ylim(bottom=min(0.5, lo / 1.5), top=max(2.0, hi * 1.8))
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels(cases, rotation=35, ha="right", fontsize=8)
            ax.set_ylabel(f"speedup vs {other}")
            ax.set_title(f"fused vs {other}: {'forward+backward' if mode == 'fwd+bwd' else 'forward'}, {dtype}",
                         fontsize=10)
            ax.grid(axis="y", which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def head_table(head_rows) -> list[str]:
    if not head_rows:
        return []
    return (["", "Cosine head:", "", "| measure | N×D×C | measured | target |", "|---|---|---|---|"]
            + ["| " + " | ".join(r) + " |" for r in head_rows])


def update_readme(readme: Path, targets, md_rel: str) -> bool:
    target_rows, head_rows = targets
    block = ["", f"Targets, fp32 forward+backward on this machine (full table: [{md_rel}]({md_rel})):",
             "", "| case | shape | fused ms | eager ms | compiled ms | fused vs eager | fused vs compiled | target | "
             "other load |",
             "|---|---|--:|--:|--:|--:|--:|---|--:|"]
    block += ["| " + " | ".join(r) + " |" for r in target_rows]
    block += head_table(head_rows)
    block += [""]
    if not replace_marked_block(readme, README_START, README_END, "\n".join(block)):
        print(f"{readme}: no {README_START} ... {README_END} markers; not updated")
        return False
    print(f"updated {readme}")
    return True


def main(argv=None) -> int:
    global USE_INTERLEAVED, NOISY
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", nargs="+", type=Path, help="render these pytest-benchmark JSON files; do not run")
    ap.add_argument("--sizes", default=os.environ.get("LTK_BENCH_SIZES", "std"), help="std | smoke | NxC,...")
    ap.add_argument("--dtypes", default=os.environ.get("LTK_BENCH_DTYPES", "fp32,bf16"))
    ap.add_argument("--compile", dest="compile", action="store_true", default=True,
                    help="include torch.compile(reference) (default)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile cases")
    ap.add_argument("-k", default=None, help="pytest -k expression to select cases")
    ap.add_argument("--max-time", type=float, default=0.3, help="pytest-benchmark max time per case (s)")
    ap.add_argument("--min-rounds", type=int, default=5, help="pytest-benchmark min rounds per case")
    ap.add_argument("--no-agree", dest="agree", action="store_false",
                    help="skip the fused-vs-eager agreement tests (--benchmark-only)")
    ap.add_argument("--stat", default="median", choices=["min", "median", "mean"])
    ap.add_argument("--interleave-time", type=float, default=0.3,
                    help="seconds per case for the interleaved fused-vs-other ratio (0: off)")
    ap.add_argument("--ratio", choices=["interleaved", "stat"], default="interleaved",
                    help="speedups from the interleaved measurement (default) or from the --stat columns")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the run (default: torch's)")
    ap.add_argument("--rerun-noisy", type=int, default=0, metavar="K",
                    help="after the run, up to K times: wait for the machine to be quiet, then re-run the "
                         "cases that were timed while other processes used > --noisy cores; the quieter "
                         "measurement of each case is kept (default 0: off)")
    ap.add_argument("--one-process", action="store_true",
                    help="run all suites in one pytest process (default: one per suite file and per loss)")
    ap.add_argument("--noisy", type=float, default=NOISY, help="other-process load (cores) that flags a case")
    ap.add_argument("--quiet-wait", type=float, default=300.0,
                    help="seconds to wait for a quiet machine before each re-run (default 300)")
    ap.add_argument("--later-wins", action="store_true",
                    help="with --json: a case measured in several files takes the later file's measurement "
                         "(re-measured after a code change) instead of the one taken under less load")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output folder (results.md, results.png)")
    ap.add_argument("--update-readme", nargs="?", const=ROOT / "README.md", type=Path, default=None,
                    help=f"rewrite the block between {README_START} and {README_END} in README.md")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    USE_INTERLEAVED = args.ratio == "interleaved"
    NOISY = args.noisy

    rc = 0
    wall = None
    if args.json:
        paths = []
        for p in args.json:
            paths += [Path(x) for x in sorted(glob.glob(str(p)))] or [p]
    else:
        if args.one_process:
            out, wall, rc = run_suites(args)
            paths = [out] if out.exists() else []
        else:
            paths, wall, rc = run_chunked(args)
        if not paths:
            print(f"no benchmark JSON written; pytest exit code {rc}", file=sys.stderr)
            return rc or 1
        print(f"benchmark run: {wall / 60:.1f} min", flush=True)
        for attempt in range(args.rerun_noisy):
            noisy = noisy_benchmarks(paths, args.noisy)
            if not noisy:
                break
            print(f"{len(noisy)} cases were timed under other processes' load > {args.noisy} cores; "
                  f"waiting up to {args.quiet_wait:.0f} s for a quiet machine", flush=True)
            t0 = time.time()
            print(f"other load now: {wait_quiet(args.noisy, args.quiet_wait):.2f} cores", flush=True)
            out2, w2, rc2 = run_suites(args, nodeids=noisy, tag=f"-rerun{attempt + 1}")
            wall += time.time() - t0  # the wait for quiet included
            if out2.exists():
                paths.append(out2)
    benches, machine = load(paths, later_wins=args.later_wins)
    md, suites, target_rows = render_markdown(benches, machine, args.stat, wall)
    args.out.mkdir(parents=True, exist_ok=True)
    md_path = args.out / "results.md"
    md_path.write_text(md)
    _, _, case_order = pivot(benches, args.stat)
    png = args.out / "results.png"
    plotted = plot(suites, png, case_order)
    print(md)
    print(f"wrote {md_path}" + (f" and {png}" if plotted else ""))
    if args.update_readme:
        try:
            rel = os.path.relpath(md_path, args.update_readme.parent)
        except ValueError:
            rel = str(md_path)
        update_readme(args.update_readme, target_rows, rel)
    return rc


if __name__ == "__main__":
    sys.exit(main())
