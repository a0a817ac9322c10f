#!/usr/bin/env bash
# tools/gpu_check.sh OUTDIR [--dry-run]
#
# The GPU check in one command, for a machine with an NVIDIA GPU, a CUDA toolkit and torch preinstalled
# (no network needed: nothing is installed). In the repository root it
#
#   1. env      writes OUTDIR/env.txt: nvidia-smi, nvcc, python, torch, the device and its capability;
#   2. build    builds ltkernels._C in place for the local GPU only (TORCH_CUDA_ARCH_LIST from
#               torch.cuda.get_device_capability(), MAX_JOBS=16, LTK_BUILD_CUDA=1: a CPU-only build fails)
#               -> OUTDIR/build.log;
#   3. tests    every test that runs on CUDA (tools/pytest_cuda_only.py: the CUDA parametrizations and the
#               GPU-only tests, python_tests/test_cuda_graphs.py included) -> OUTDIR/tests.log, OUTDIR/tests.xml
#               (JUnit); pytest-xdist spreads them over 4 processes when it is installed;
#   4. bench    python bench/bench_cuda.py --out OUTDIR --budget S -> OUTDIR/bench_cuda.md, bench_cuda.json,
#               OUTDIR/bench.log (progress lines also on stdout);
#   5. head     python bench/bench_cuda_head.py --out OUTDIR --budget S (the cosine head with its loss:
#               chunked vs fused vs eager, time and peak memory) -> OUTDIR/bench_cuda_head.md,
#               bench_cuda_head.json, OUTDIR/head.log;
#   6. summary  OUTDIR/summary.md (also printed): each step's status and time, the test counts, the targets.
#
# The whole run stays within GPU_CHECK_BUDGET seconds (default 470, under 8 minutes): every step has a
# timeout (SIGINT first, so pytest and the benchmark still write what they have), the benchmark gets what
# is left and stops starting rows in time. A failing build skips the tests and the benchmark (they would
# run against no extension); a failing test step does not stop the benchmark. Exit status: 0 when every
# step passed, 1 otherwise, 2 for a usage error.
#
# --dry-run prints the steps and their commands and runs nothing.
# Environment: PYTHON (the interpreter; default: .venv/bin/python, python3 or python, the first that
# imports torch), GPU_CHECK_BUDGET, MAX_JOBS, TORCH_CUDA_ARCH_LIST (default: the local capability).
set -euo pipefail

usage() { echo "usage: tools/gpu_check.sh OUTDIR [--dry-run]"; }

OUT="" DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; exit 2 ;;
    *) if [ -n "$OUT" ]; then usage >&2; exit 2; fi; OUT=$arg ;;
  esac
done
[ -n "$OUT" ] || { usage >&2; exit 2; }

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=$(realpath -m "$OUT")
BUDGET=${GPU_CHECK_BUDGET:-470}
BENCH_MIN=150   # seconds the benchmarks keep whatever the steps before them take
HEAD_MIN=60     # of which the head benchmark's
SECONDS=0

find_python() {
  local p
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return 0; fi
  for p in "$ROOT/.venv/bin/python" python3 python; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" >/dev/null 2>&1; then echo "$p"; return 0; fi
  done
  return 1
}
PY=$(find_python) || PY=""

left() { echo $((BUDGET - SECONDS)); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
max() { if [ "$1" -gt "$2" ]; then echo "$1"; else echo "$2"; fi; }

STEPS=() STATUS=() TIMES=()
FAILED=0

# run_step NAME TIMEOUT_S LOG tee|quiet CMD...: runs CMD under timeout, output to LOG (and stdout with tee);
# records the status. With --dry-run it only prints the command.
run_step() {
  local name=$1 limit=$2 log=$3 mode=$4
  shift 4
  if [ "$DRY" = 1 ]; then
    printf '[dry-run] %-7s: %s > %s\n' "$name" "$*" "$log"
    return 0
  fi
  echo "== $name (timeout ${limit}s, t=${SECONDS}s): $*"
  local t0=$SECONDS rc=0
  if [ "$mode" = tee ]; then
    timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
  else
    timeout -s INT -k 20 "$limit" "$@" >"$log" 2>&1 || rc=$?
  fi
  local status=passed
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status="timed out (${limit}s)"
  elif [ "$rc" != 0 ]; then
    status="failed (exit $rc)"
  fi
  [ "$status" = passed ] || FAILED=1
  STEPS+=("$name") STATUS+=("$status") TIMES+=($((SECONDS - t0)))
  echo "== $name: $status in $((SECONDS - t0))s (log: $log)"
  [ "$status" = passed ]
}

skip_step() {
  STEPS+=("$1") STATUS+=("skipped: $2") TIMES+=(0)
  FAILED=1
  [ "$DRY" = 1 ] && echo "[dry-run] $1: skipped ($2)" || echo "== $1: skipped ($2)"
}

# ---- 1. env ---------------------------------------------------------------------------------------------
ENV_PY='
import os, platform, sys, torch
print("python:", sys.executable, platform.python_version())
print("torch:", torch.__version__, "CUDA", torch.version.cuda)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device: %s | capability %d.%d | %.1f GiB | %d SMs"
          % (p.name, p.major, p.minor, p.total_memory / 2**30, p.multi_processor_count))
for mod in ("pytest", "xdist", "triton"):
    try:
        m = __import__(mod)
        print(mod + ":", getattr(m, "__version__", "?"))
    except ImportError:
        print(mod + ": not installed")
'
ARCH=${TORCH_CUDA_ARCH_LIST:-}
if [ "$DRY" = 1 ]; then
  echo "[dry-run] budget : ${BUDGET}s in all; timeouts: build <= 300s, tests <= 240s, bench: the rest" \
       "(at least ${BENCH_MIN}s, ${HEAD_MIN}s of it for the head benchmark)"
  echo "[dry-run] python : ${PY:-none that imports torch}"
  echo "[dry-run] env    : nvidia-smi, nvcc --version, python/torch/device info > $OUT/env.txt"
  ARCH=${ARCH:-"<major.minor of torch.cuda.get_device_capability()>"}
else
  mkdir -p "$OUT"
  # a reused OUTDIR: no stale results in this run's summary
  rm -f "$OUT"/{env.txt,build.log,tests.log,tests.xml,bench.log,bench_cuda.md,bench_cuda.json,head.log}
  rm -f "$OUT"/{bench_cuda_head.md,bench_cuda_head.json,summary.md}
  [ -n "$PY" ] || { echo "gpu_check: no python that imports torch (set PYTHON)" >&2; exit 1; }
  {
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cores: $(nproc)"
    if git rev-parse HEAD >/dev/null 2>&1; then
      echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ local changes)')"
    fi
    echo; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    echo; (nvcc --version || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version) 2>&1 | tail -2
    echo "ninja: $(ninja --version 2>/dev/null || echo 'not found (the build falls back to a serial one)')"
    echo; "$PY" -c "$ENV_PY" 2>&1
  } >"$OUT/env.txt" 2>&1 || true
  cat "$OUT/env.txt"
  if [ -z "$ARCH" ]; then
    ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null) || ARCH=""
  fi
  if [ -z "$ARCH" ]; then
    STEPS+=(env) STATUS+=("failed: torch sees no CUDA device") TIMES+=("$SECONDS"); FAILED=1
    ARCH="8.0;9.0+PTX"  # setup.py's default; the build still says whether the sources compile
  else
    STEPS+=(env) STATUS+=(passed) TIMES+=("$SECONDS")
  fi
fi

# ---- 2. build -------------------------------------------------------------------------------------------
CHECK_EXT='import torch, ltkernels.functional
ok = torch.ops.ltkernels.margin_ce.default.has_kernel_for_dispatch_key("CUDA")
print("ltkernels._C imported; CUDA kernels registered:", ok)
raise SystemExit(0 if ok else 1)'
BUILT=0
if run_step build "$(min 300 "$(max 60 $(($(left) - BENCH_MIN - 20)))")" "$OUT/build.log" quiet \
     env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" LTK_BUILD_CUDA=1 \
     "${PY:-python}" setup.py build_ext --inplace; then
  BUILT=1
  if [ "$DRY" = 1 ]; then
    echo "[dry-run] build  : then checks that ltkernels imports with its CUDA kernels >> $OUT/build.log"
  elif ! "$PY" -c "$CHECK_EXT" >>"$OUT/build.log" 2>&1; then
    BUILT=0 FAILED=1
    STATUS[${#STATUS[@]} - 1]="failed: ltkernels does not import with CUDA kernels"
  fi
  [ "$DRY" = 1 ] || tail -n 1 "$OUT/build.log"
fi
[ "$BUILT" = 1 ] || [ "$DRY" = 1 ] || tail -n 30 "$OUT/build.log"

# ---- 3. tests -------------------------------------------------------------------------------------------
XDIST=()
if [ -n "$PY" ] && "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST=(-n 4); fi
if [ "$BUILT" = 1 ] || [ "$DRY" = 1 ]; then
  run_step tests "$(min 240 "$(max 60 $(($(left) - BENCH_MIN - 10)))")" "$OUT/tests.log" quiet \
    env PYTHONPATH="$ROOT/tools${PYTHONPATH:+:$PYTHONPATH}" "${PY:-python}" -m pytest python_tests -q \
    -p no:cacheprovider -p pytest_cuda_only ${XDIST[@]+"${XDIST[@]}"} --junitxml="$OUT/tests.xml" || true
  [ "$DRY" = 1 ] || tail -n 15 "$OUT/tests.log"
else
  skip_step tests "the build failed"
fi

# ---- 4. bench -------------------------------------------------------------------------------------------
if [ "$BUILT" = 1 ] || [ "$DRY" = 1 ]; then
  # the benchmark stops starting rows at its --budget; a row started just before may take a minute more
  BENCH_BUDGET=$(max 30 $(($(left) - 75 - HEAD_MIN)))
  [ "$DRY" = 0 ] || BENCH_BUDGET="<seconds left - 75 - ${HEAD_MIN}>"
  run_step bench "$(max 60 $(($(left) - 15 - HEAD_MIN)))" "$OUT/bench.log" tee \
    "${PY:-python}" bench/bench_cuda.py --out "$OUT" --budget "$BENCH_BUDGET" || true
else
  skip_step bench "the build failed"
fi

# ---- 5. head benchmark ----------------------------------------------------------------------------------
if [ "$BUILT" = 1 ] || [ "$DRY" = 1 ]; then
  HEAD_BUDGET=$(max 20 $(($(left) - 40)))
  [ "$DRY" = 0 ] || HEAD_BUDGET="<seconds left - 40>"
  run_step head "$(max 30 $(($(left) - 10)))" "$OUT/head.log" tee \
    "${PY:-python}" bench/bench_cuda_head.py --out "$OUT" --budget "$HEAD_BUDGET" || true
else
  skip_step head "the build failed"
fi

# ---- 6. summary -----------------------------------------------------------------------------------------
SUMMARY_PY='
import json, os, sys
import xml.etree.ElementTree as ET
out, lines = sys.argv[1], sys.argv[2:]
md = ["# gpu_check", "", "| step | status | s |", "|---|---|--:|"] + lines + [""]
xml = os.path.join(out, "tests.xml")
if os.path.exists(xml):
    root = ET.parse(xml).getroot()
    s = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    md.append("Tests: %(tests)d run, %(failures)d failed, %(errors)d errors, %(skipped)d skipped"
              " (tests.xml, tests.log)." % n
              + (" Every test skipped: torch sees no GPU?" if n["tests"] and n["tests"] == n["skipped"] else ""))
    bad = [c.get("classname", "") + "::" + c.get("name", "") for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    md += ["* FAILED " + b for b in bad[:30]] + (["* ... %d more" % (len(bad) - 30)] if len(bad) > 30 else [])
    md.append("")
js = os.path.join(out, "bench_cuda.json")
if os.path.exists(js):
    doc = json.load(open(js))
    m = doc["meta"]
    md.append("Benchmark: %d rows%s on %s (bench_cuda.md, bench_cuda.json). Targets (reported, not asserted):"
              % (len(doc["rows"]), "" if m["complete"] else ", %d left out" % m["rows_left_out"], m["device_name"]))
    md += [""] + ["* %s: %s" % (t["target"], "not measured" if t["value"] is None else "%.2f%s %s" % (
        t["value"], t["unit"], "met" if t["met"] else "NOT met")) for t in doc["targets"]] + (
        [] if doc["targets"] else ["* none measured"])
    bad = ["%s %dx%d %s" % (r["loss"], *r["shape"], r["dtype"]) for r in doc["rows"] if not r["agree"].get("ok")]
    md += ["", "Fused vs reference: " + ("all rows agree" if not bad else "DISAGREE in " + ", ".join(bad))]
js = os.path.join(out, "bench_cuda_head.json")
if os.path.exists(js):
    doc = json.load(open(js))
    md += ["", "Head benchmark: %d rows%s (bench_cuda_head.md, bench_cuda_head.json). Targets:"
           % (len(doc["rows"]), "" if doc["meta"]["complete"] else ", %d left out" % doc["meta"]["rows_left_out"])]
    md += [""] + ["* %s: %s" % (t["target"], "not measured" if t["value"] is None else "%.3f %s" % (
        t["value"], "met" if t["met"] else "NOT met")) for t in doc["targets"]] + (
        [] if doc["targets"] else ["* none measured"])
    bad = ["%s %s %s" % (r["loss"], "x".join(map(str, r["shape"])), r["dtype"]) for r in doc["rows"]
           if not r["agree"].get("ok")]
    md += ["", "Chunked head + loss vs eager: " + ("all rows agree" if not bad else "DISAGREE in " + ", ".join(bad))]
open(os.path.join(out, "summary.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
'
if [ "$DRY" = 1 ]; then
  echo "[dry-run] summary: step status, test counts from $OUT/tests.xml," \
       "targets from $OUT/bench_cuda.json and $OUT/bench_cuda_head.json > $OUT/summary.md"
  exit 0
fi
ROWS=()
for i in "${!STEPS[@]}"; do ROWS+=("| ${STEPS[$i]} | ${STATUS[$i]} | ${TIMES[$i]} |"); done
ROWS+=("| total | $([ "$FAILED" = 0 ] && echo passed || echo FAILED) | $SECONDS |")
echo
"$PY" -c "$SUMMARY_PY" "$OUT" "${ROWS[@]}" || printf '%s\n' "${ROWS[@]}"
exit "$FAILED"
