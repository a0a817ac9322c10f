#!/usr/bin/env python3
"""Compile gate for the CUDA kernels: registers, spills and shared memory per kernel, per arch.

Compiles every csrc/cuda/*.cu (device code only: ``nvcc -fatbin``, both archs in one invocation) with the
extension's nvcc flags plus ``-Xptxas -v``, parses ptxas' report, writes a Markdown table (default
bench/results/cuda_resources.md) and exits non-zero when any function spills or a file fails to compile.

    python tools/cuda_resource_report.py                  # default archs 8.0 and 9.0, 2 parallel jobs
    python tools/cuda_resource_report.py --arch 9.0 --json /tmp/r.json --no-cache

Exit status: 0 clean, 1 spills, 2 a compile error, 3 no nvcc (or no .cu files with --require-files).
Results are cached per .cu under build/cuda_resources/ keyed by nvcc version, flags and the contents of
csrc/include, csrc/cuda and the .cu, so an unchanged tree reports in well under a second.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_ARCHS = ["8.0", "9.0"]


def find_nvcc() -> str | None:
    """$CUDA_HOME/bin/nvcc, then /usr/local/cuda/bin/nvcc, then PATH (which may hold a shim)."""
    cands = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    cands.append("/usr/local/cuda/bin/nvcc")
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return shutil.which("nvcc")


def include_flags() -> list[str]:
    nvcc = find_nvcc()
    if nvcc:  # tell torch where the toolkit is (it otherwise guesses from a shim on PATH and warns)
        os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    flags = ["-I" + os.path.join(ROOT, "csrc", "include"), "-I" + os.path.join(ROOT, "csrc")]
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension

        flags += ["-I" + p for p in cpp_extension.include_paths()]
        common = list(cpp_extension.COMMON_NVCC_FLAGS)
        import torch as _t

        abi = ["-D_GLIBCXX_USE_CXX11_ABI=" + str(int(_t._C._GLIBCXX_USE_CXX11_ABI))]
    except Exception:  # torch missing: the kernels' own headers may still compile
        common, abi = ["--expt-relaxed-constexpr"], []
    # torch's pip wheels ship the CUDA headers here
    for sp in sys.path:
        inc = os.path.join(sp, "nvidia", "cu13", "include")
        if os.path.isdir(inc):
            flags.append("-I" + inc)
            break
    return flags + common + abi


def cxx_std() -> str:
    """The -std of the extension's nvcc flags in setup.py (so that the gate compiles like the build)."""
    try:
        with open(os.path.join(ROOT, "setup.py")) as f:
            m = re.search(r'extra\["nvcc"\]\s*=\s*\[([^\]]*)', f.read())
        mm = re.search(r"-std=(c\+\+\d+)", m.group(1)) if m else None
        if mm:
            return "-std=" + mm.group(1)
    except OSError:
        pass
    return "-std=c++20"


def nvcc_flags(archs: list[str]) -> list[str]:
    gencode = []
    for a in archs:
        sm = a.replace(".", "")
        gencode += ["-gencode", f"arch=compute_{sm},code=sm_{sm}"]
    # the extension's flags (setup.py) + the extension macros
    return [cxx_std(), "-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas", "-v",
            "-Xcudafe", "--diag_suppress=177", "-DLTK_WITH_CUDA=1", "-DTORCH_API_INCLUDE_EXTENSION_H",
            "-DTORCH_EXTENSION_NAME=_C", *gencode]


def _sha_tree(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.encode())
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _tree_files() -> list[str]:
    out = []
    for d in ("csrc/include", "csrc/cuda"):
        for dp, _, fs in os.walk(os.path.join(ROOT, d)):
            out += [os.path.join(dp, f) for f in fs]
    return out


_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_RE_PROPS = re.compile(r"Function properties for (\S+)")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_BARS = re.compile(r"used (\d+) barriers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")
_RE_CMEM = re.compile(r"(\d+) bytes cmem\[0\]")


def parse_ptxas(log: str) -> list[dict]:
    """Per (function, arch): registers, stack, spills, static smem, barriers; entry or device function."""
    rows: dict[tuple[str, str], dict] = {}
    arch = "?"
    props_for = None
    for line in log.splitlines():
        m = _RE_ENTRY.search(line)
        if m:
            arch = m.group(2)
            rows.setdefault((m.group(1), arch), {"function": m.group(1), "arch": arch, "entry": True})
            props_for = None
            continue
        m = _RE_PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = _RE_SPILL.search(line)
        if m and props_for:
            r = rows.setdefault((props_for, arch), {"function": props_for, "arch": arch, "entry": False})
            r.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = _RE_USED.search(line)
        if m and props_for:
            r = rows.setdefault((props_for, arch), {"function": props_for, "arch": arch, "entry": False})
            r["registers"] = int(m.group(1))
            for key, rx in (("barriers", _RE_BARS), ("smem", _RE_SMEM), ("cmem0", _RE_CMEM)):
                mm = rx.search(line)
                r[key] = int(mm.group(1)) if mm else 0
    out = []
    for r in rows.values():
        r.setdefault("registers", 0)
        r.setdefault("stack", 0)
        r.setdefault("spill_stores", 0)
        r.setdefault("spill_loads", 0)
        r.setdefault("smem", 0)
        r.setdefault("barriers", 0)
        out.append(r)
    return out


_RE_PTX_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(")
_RE_PTX_NTID = re.compile(r"\.(maxntid|reqntid)\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?")


def parse_ptx_bounds(ptx: str) -> dict[str, int]:
    """__launch_bounds__ of each entry: kernel -> max threads per block (.maxntid / .reqntid product)."""
    out = {}
    for m in _RE_PTX_ENTRY.finditer(ptx):
        body_start = ptx.find("{", m.end())
        header = ptx[m.end():body_start if body_start >= 0 else None]
        nm = _RE_PTX_NTID.search(header)
        if nm:
            dims = [int(g) for g in nm.groups()[1:] if g]
            n = 1
            for d in dims:
                n *= d
            out[m.group(1)] = n
    return out


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    p = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    dem = p.stdout.splitlines()
    return {n: (dem[i] if i < len(dem) else n) for i, n in enumerate(names)}


def compile_one(nvcc: str, cu: str, archs: list[str], cache_dir: str | None, tree_key: str) -> dict:
    flags = nvcc_flags(archs) + include_flags()
    key = hashlib.sha256("\n".join([tree_key, cu, nvcc, _nvcc_version(nvcc), *flags]).encode()).hexdigest()[:24]
    cached = os.path.join(cache_dir, os.path.basename(cu) + "." + key + ".json") if cache_dir else None
    if cached and os.path.exists(cached):
        with open(cached) as f:
            res = json.load(f)
        res["cached"] = True
        return res
    t0 = time.time()
    bounds: dict[tuple[str, str], int] = {}
    with tempfile.TemporaryDirectory() as td:
        cmd = [nvcc, *flags, "-fatbin", cu, "-o", os.path.join(td, "out.fatbin"), "--keep", "--keep-dir", td]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        for f in os.listdir(td):
            m = re.search(r"compute_(\d+a?)\.ptx$", f)
            if m:
                with open(os.path.join(td, f)) as fh:
                    for k, n in parse_ptx_bounds(fh.read()).items():
                        bounds[(k, "sm_" + m.group(1))] = n
    log = p.stdout + p.stderr
    functions = parse_ptxas(log)
    for fn in functions:
        fn["launch_bound"] = bounds.get((fn["function"], fn["arch"]), 0)
        # threads one block may have with this register count (64K registers per SM, allocated per warp
        # in units of 256): launching more fails with "too many resources requested for launch"
        regs_per_warp = -(-max(fn["registers"], 1) * 32 // 256) * 256
        fn["reg_limited_threads"] = min(1024, 65536 // regs_per_warp * 32)
    warnings = [ln for ln in log.splitlines() if "warning" in ln.lower() and not ln.startswith("ptxas info")]
    res = {"file": os.path.relpath(cu, ROOT), "returncode": p.returncode, "seconds": round(time.time() - t0, 1),
           "functions": functions, "warnings": warnings,
           "errors": "" if p.returncode == 0 else log[-8000:], "command": " ".join(cmd), "cached": False}
    if cached and p.returncode == 0:
        os.makedirs(cache_dir, exist_ok=True)
        for f in os.listdir(cache_dir):  # drop stale entries of this file
            if f.startswith(os.path.basename(cu) + ".") and f.endswith(".json"):
                os.remove(os.path.join(cache_dir, f))
        with open(cached + f".{os.getpid()}.tmp", "w") as f:
            json.dump(res, f)
        os.replace(cached + f".{os.getpid()}.tmp", cached)  # atomic for concurrent readers
    return res


_nvcc_versions: dict[str, str] = {}


def _nvcc_version(nvcc: str) -> str:
    if nvcc not in _nvcc_versions:
        p = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
        _nvcc_versions[nvcc] = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "?"
    return _nvcc_versions[nvcc]


def markdown(results: list[dict], archs: list[str], nvcc: str) -> str:
    names = sorted({fn["function"] for r in results for fn in r["functions"]})
    dem = demangle(names)
    spills = sum(fn["spill_stores"] + fn["spill_loads"] > 0 for r in results for fn in r["functions"])
    lines = [
        "# CUDA kernel resources (ptxas -v)",
        "",
        f"Generated by `python tools/cuda_resource_report.py` with {_nvcc_version(nvcc)}, archs "
        f"{', '.join('sm_' + a.replace('.', '') for a in archs)}, device code of every `csrc/cuda/*.cu`. "
        "Static shared memory only (dynamic shared memory is a launch parameter). Launch bound: "
        "`__launch_bounds__` max threads per block (from the PTX). Max threads by registers: the largest "
        "block the register count allows (64K registers per SM, 256-register warp granules). Gate: zero "
        "spills.",
        "",
        f"**Spilling functions: {spills}.** Files: {len(results)}; "
        f"compile errors: {sum(r['returncode'] != 0 for r in results)}; "
        f"warnings: {sum(len(r['warnings']) for r in results)}.",
        "",
        "| file | function | arch | registers | stack (B) | spill stores (B) | spill loads (B) | static smem (B) "
        "| barriers | launch bound | max threads by registers |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: r["file"]):
        for fn in sorted(r["functions"], key=lambda f: (not f["entry"], dem.get(f["function"], ""), f["arch"])):
            name = dem.get(fn["function"], fn["function"]).replace("|", "\\|")
            if not fn["entry"]:
                name += " (device fn)"
            flag = " **SPILL**" if fn["spill_stores"] + fn["spill_loads"] else ""
            lines.append(f"| {r['file']} | `{name}`{flag} | {fn['arch']} | {fn['registers']} | {fn['stack']} | "
                         f"{fn['spill_stores']} | {fn['spill_loads']} | {fn['smem']} | {fn['barriers']} | "
                         f"{fn.get('launch_bound') or '-'} | {fn.get('reg_limited_threads', '-') if fn['entry'] else '-'} |")
        if r["returncode"] != 0:
            lines.append(f"| {r['file']} | **compile error** (see stderr of the tool) | | | | | | | | | |")
    if not results:
        lines.append("| (no csrc/cuda/*.cu yet) | | | | | | | | | | |")
    warn = [(r["file"], w) for r in results for w in r["warnings"]]
    if warn:
        lines += ["", "## Warnings", ""] + [f"- {f}: `{w.strip()}`" for f, w in warn]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", help="compute capability, e.g. 8.0 (repeatable; default 8.0, 9.0)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes (at most 2)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "cuda_resources.md"))
    ap.add_argument("--json", help="also write the parsed results as JSON here")
    ap.add_argument("--files", nargs="*", help="only these .cu files (default: csrc/cuda/*.cu)")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--require-files", action="store_true", help="exit 3 when there is no .cu file")
    a = ap.parse_args(argv)
    archs = a.arch or DEFAULT_ARCHS
    nvcc = find_nvcc()
    if not nvcc:
        print("cuda_resource_report: no nvcc found (set CUDA_HOME)", file=sys.stderr)
        return 3
    cus = a.files or sorted(os.path.join(ROOT, "csrc", "cuda", f) for f in os.listdir(os.path.join(ROOT, "csrc", "cuda"))
                            if f.endswith(".cu"))
    cus = [os.path.abspath(c) for c in cus]
    if not cus and a.require_files:
        print("cuda_resource_report: no csrc/cuda/*.cu", file=sys.stderr)
        return 3
    cache_dir = None if a.no_cache else os.path.join(ROOT, "build", "cuda_resources")
    tree_key = _sha_tree(_tree_files())
    jobs = max(1, min(2, a.jobs))
    t0 = time.time()
    with ThreadPoolExecutor(jobs) as ex:
        results = list(ex.map(lambda c: compile_one(nvcc, c, archs, cache_dir, tree_key), cus))
    md = markdown(results, archs, nvcc)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"archs": archs, "nvcc": _nvcc_version(nvcc), "results": results}, f, indent=1)
    status = 0
    for r in results:
        tag = "cached" if r.get("cached") else f"{r['seconds']}s"
        print(f"{r['file']}: {len([f for f in r['functions'] if f['entry']])} kernel entries (all archs), "
              f"rc={r['returncode']} ({tag})", file=sys.stderr)
        if r["returncode"] != 0:
            print(r["errors"], file=sys.stderr)
            status = 2
    spilling = [(r["file"], fn) for r in results for fn in r["functions"] if fn["spill_stores"] + fn["spill_loads"]]
    for f, fn in spilling:
        print(f"SPILL {f}: {fn['function']} {fn['arch']}: {fn['spill_stores']} B stores, "
              f"{fn['spill_loads']} B loads", file=sys.stderr)
    if spilling and status == 0:
        status = 1
    print(f"cuda_resource_report: {len(cus)} file(s), {len(spilling)} spilling function(s), "
          f"{time.time() - t0:.1f}s -> {os.path.relpath(a.out, ROOT)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
