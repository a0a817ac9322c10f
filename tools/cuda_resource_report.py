#!/usr/bin/env python3
"""Compile gate for the CUDA kernels: resources per kernel and arch, and the SASS gates.

Compiles every csrc/cuda/*.cu once (device code only: ``nvcc -fatbin``, every arch in one invocation) with
the extension's nvcc flags plus ``-Xptxas -v``, keeping the cubins; reads registers, spills and static
shared memory from ptxas' report and the launch bounds from the PTX; disassembles the cubins of the SASS
arch (``nvdisasm``; the analysis is tools/cuda_sass.py: loops, per-loop instruction counts, occupancy) and
checks them against the gates of bench/sass_gates.json (its "_about" documents the schema). Writes one
Markdown report, default bench/results/cuda_resources.md.

    python tools/cuda_resource_report.py                    # archs 8.0 and 9.0, SASS gates on sm_90
    python tools/cuda_resource_report.py --no-sass          # resources and spills only
    python tools/cuda_resource_report.py --files k.cu --bare --arch 9.0 --gates g.json --out /tmp/r.md

Exit status: 0 clean; 1 a spill or a violated SASS gate (one ``SASS GATE FAILED`` line each on stderr);
2 a compile error; 3 no nvcc (or no .cu with --require-files); 4 a bad gate file, a gate entry that
matches no kernel (a renamed kernel must not pass silently) or SASS the analysis cannot model. Without
nvdisasm (a CUDA toolkit's, or the copy triton bundles) the SASS gates are skipped with a warning.
Results and cubins are cached per .cu under build/cuda_resources/, keyed by nvcc's version, the flags,
this tool's cache version and the contents of csrc/include, csrc/cuda, csrc/*.h and the .cu's directory,
so an unchanged tree reports in seconds.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_sass  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_ARCHS = ["8.0", "9.0"]
SASS_ARCH = "9.0"
DEFAULT_GATES = os.path.join(ROOT, "bench", "sass_gates.json")
DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "cuda_resources.md")
CACHE_DIR = os.path.join(ROOT, "build", "cuda_resources")
CACHE_VERSION = "3"  # bump when a cached result's contents change
EXIT_OK, EXIT_FAIL, EXIT_COMPILE, EXIT_TOOL, EXIT_GATES = 0, 1, 2, 3, 4


# ----------------------------------------------------------------------------------------------- tools

def find_cuda_tool(name: str) -> str | None:
    """A CUDA toolkit binary: $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin, then PATH (which may hold
    a shim); nvdisasm / cuobjdump last from triton's bundled copies (triton/backends/nvidia/bin)."""
    dirs = [os.path.join(os.environ[v], "bin") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    for d in dirs + ["/usr/local/cuda/bin"]:
        c = os.path.join(d, name)
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    on_path = shutil.which(name)
    if on_path or name == "nvcc":
        return on_path
    spec = importlib.util.find_spec("triton")  # locates the package without importing it
    for loc in (spec.submodule_search_locations or []) if spec else []:
        c = os.path.join(loc, "backends", "nvidia", "bin", name)
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def find_nvcc() -> str | None:
    return find_cuda_tool("nvcc")


_nvcc_versions: dict[str, str] = {}


def nvcc_version(nvcc: str) -> str:
    if nvcc not in _nvcc_versions:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip()
        _nvcc_versions[nvcc] = out.splitlines()[-1] if out else "?"
    return _nvcc_versions[nvcc]


# ----------------------------------------------------------------------------------------------- flags

def include_flags() -> list[str]:
    """The csrc and torch include paths, torch's common nvcc flags and ABI macro, and the CUDA headers of
    torch's pip wheels."""
    nvcc = find_nvcc()
    if nvcc:  # tell torch where the toolkit is (it otherwise guesses from a shim on PATH and warns)
        os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    flags = ["-I" + os.path.join(ROOT, "csrc", "include"), "-I" + os.path.join(ROOT, "csrc")]
    try:
        import torch
        from torch.utils import cpp_extension

        flags += ["-I" + p for p in cpp_extension.include_paths()]
        common = list(cpp_extension.COMMON_NVCC_FLAGS)
        abi = ["-D_GLIBCXX_USE_CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI))]
    except Exception:  # torch missing: the kernels' own headers may still compile
        common, abi = ["--expt-relaxed-constexpr"], []
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
    """The extension's device flags (setup.py) and macros, ptxas' report, line info (the SASS report's
    source lines), one -gencode per arch."""
    sms = [a.replace(".", "") for a in archs]
    gencode = [f for sm in sms for f in ("-gencode", f"arch=compute_{sm},code=sm_{sm}")]
    return [cxx_std(), "-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas", "-v",
            "-Xcudafe", "--diag_suppress=177", "-DLTK_WITH_CUDA=1", "-DTORCH_API_INCLUDE_EXTENSION_H",
            "-DTORCH_EXTENSION_NAME=_C", *gencode]


# --------------------------------------------------------------------------------------- ptxas / PTX

_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_RE_PROPS = re.compile(r"Function properties for (\S+)")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_BARS = re.compile(r"used (\d+) barriers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> list[dict[str, Any]]:
    """Per (function, arch) of ``ptxas -v``: registers, stack, spills, static smem, barriers; entry or not."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    arch, props_for = "?", None

    def row(name: str, entry: bool = False) -> dict[str, Any]:
        return rows.setdefault((name, arch), {"function": name, "arch": arch, "entry": entry, "registers": 0,
                                              "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0,
                                              "barriers": 0})

    for line in log.splitlines():
        if m := _RE_ENTRY.search(line):
            arch, props_for = m.group(2), None
            row(m.group(1), entry=True)
        elif m := _RE_PROPS.search(line):
            props_for = m.group(1)
        elif (m := _RE_SPILL.search(line)) and props_for:
            row(props_for).update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif (m := _RE_USED.search(line)) and props_for:
            r = row(props_for)
            r["registers"] = int(m.group(1))
            for key, rx in (("barriers", _RE_BARS), ("smem", _RE_SMEM)):
                mm = rx.search(line)
                r[key] = int(mm.group(1)) if mm else 0
    return list(rows.values())


_RE_PTX_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(")
_RE_PTX_NTID = re.compile(r"\.(?:maxntid|reqntid)\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?")


def parse_ptx_bounds(ptx: str) -> dict[str, int]:
    """__launch_bounds__ of each entry: kernel -> max threads per block (.maxntid / .reqntid product)."""
    out = {}
    for m in _RE_PTX_ENTRY.finditer(ptx):
        body = ptx.find("{", m.end())
        nm = _RE_PTX_NTID.search(ptx[m.end():body if body >= 0 else None])
        if nm:
            n = 1
            for d in nm.groups():
                n *= int(d) if d else 1
            out[m.group(1)] = n
    return out


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    dem = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return {n: (dem[i] if i < len(dem) else n) for i, n in enumerate(names)}


# --------------------------------------------------------------------------------------------- compile

def _sha_files(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(set(paths)):
        h.update(p.encode())
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def source_files(cu: str) -> list[str]:
    """What a .cu may include: csrc/include, csrc/cuda, csrc/*.h and the files next to the .cu."""
    out = []
    for d in ("csrc/include", "csrc/cuda"):
        for dp, _, fs in os.walk(os.path.join(ROOT, d)):
            out += [os.path.join(dp, f) for f in fs]
    for d in (os.path.join(ROOT, "csrc"), os.path.dirname(cu)):
        out += [os.path.join(d, f) for f in os.listdir(d) if f.endswith((".h", ".cuh", ".cu"))]
    return out


def compile_one(nvcc: str, cu: str, archs: list[str], flags: list[str], cache_dir: str) -> dict[str, Any]:
    """``nvcc -fatbin`` of one .cu for every arch: {file, returncode, seconds, functions (ptxas rows with
    launch_bound and reg_limited_threads), cubins (arch -> file name in cache_dir), warnings, errors,
    command, cached}. Only a successful compile is cached."""
    key = hashlib.sha256("\n".join([CACHE_VERSION, _sha_files(source_files(cu)), cu, nvcc, nvcc_version(nvcc),
                                    *flags]).encode()).hexdigest()[:24]
    stem = os.path.basename(cu)
    result_path = os.path.join(cache_dir, f"{stem}.{key}.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            res = json.load(f)
        have = {arch for arch, n in res["cubins"].items() if os.path.exists(os.path.join(cache_dir, n))}
        if have == {"sm_" + a.replace(".", "") for a in archs}:
            return dict(res, cached=True)
    t0 = time.time()
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        cmd = [nvcc, *flags, "-fatbin", cu, "-o", os.path.join(td, "out.fatbin"), "--keep", "--keep-dir", td]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        bounds: dict[tuple[str, str], int] = {}
        cubins: dict[str, str] = {}
        for f in os.listdir(td):
            # <stem>.compute_90.cubin, or <stem>.cubin when there is one arch
            m = re.search(r"(?:\.compute_(\d+a?))?\.(ptx|cubin)$", f)
            if not m or p.returncode != 0:
                continue
            arch = "sm_" + (m.group(1) or archs[0].replace(".", ""))
            if m.group(2) == "ptx":
                with open(os.path.join(td, f)) as fh:
                    bounds.update(((k, arch), n) for k, n in parse_ptx_bounds(fh.read()).items())
            else:
                cubins[arch] = f"{stem}.{key}.{arch}.cubin"
                dst = os.path.join(cache_dir, cubins[arch])
                shutil.copyfile(os.path.join(td, f), dst + f".{os.getpid()}.tmp")
                os.replace(dst + f".{os.getpid()}.tmp", dst)
    log = p.stdout + p.stderr
    functions = parse_ptxas(log)
    for fn in functions:
        fn["launch_bound"] = bounds.get((fn["function"], fn["arch"]), 0)
        fn["reg_limited_threads"] = cuda_sass.max_block_threads(fn["registers"])
    res = {"file": os.path.relpath(cu, ROOT), "returncode": p.returncode, "seconds": round(time.time() - t0, 1),
           "functions": functions, "cubins": cubins,
           "warnings": [ln for ln in log.splitlines() if "warning" in ln.lower() and not ln.startswith("ptxas info")],
           "errors": "" if p.returncode == 0 else log[-8000:], "command": " ".join(cmd), "cached": False}
    if p.returncode == 0:
        for f in os.listdir(cache_dir):  # this .cu's stale entries
            if f.startswith(stem + ".") and not f.startswith(f"{stem}.{key}.") and not f.endswith(".tmp"):
                os.remove(os.path.join(cache_dir, f))
        with open(result_path + f".{os.getpid()}.tmp", "w") as f:
            json.dump(res, f)
        os.replace(result_path + f".{os.getpid()}.tmp", result_path)  # after the cubins: atomic for readers
    return res


# ------------------------------------------------------------------------------------------------ SASS

def sass_kernels(nvdisasm: str, results: list[dict[str, Any]], cache_dir: str, arch: str, dem: dict[str, str],
                 jobs: int) -> list[dict[str, Any]]:
    """The cuda_sass records of every kernel of ``arch`` in the compiled files (cubins in ``cache_dir``)."""
    def one(r: dict[str, Any]) -> list[dict[str, Any]]:
        if arch not in r["cubins"]:
            raise cuda_sass.SassError(f"{r['file']}: nvcc kept no {arch} cubin (kept: {sorted(r['cubins'])})")
        cubin = os.path.join(cache_dir, r["cubins"][arch])
        p = subprocess.run([nvdisasm, "-c", "-g", cubin], capture_output=True, text=True)
        if p.returncode != 0:
            raise cuda_sass.SassError(f"nvdisasm {cubin} failed: {p.stderr[-2000:]}")
        entries = {fn["function"]: fn for fn in r["functions"] if fn["entry"] and fn["arch"] == arch}
        return cuda_sass.analyse(p.stdout, entries, arch, r["file"], dem)

    with ThreadPoolExecutor(jobs) as ex:
        return [k for ks in ex.map(one, [r for r in results if r["returncode"] == 0]) for k in ks]


def print_gate_report(report: dict[str, Any]) -> None:
    if report["ungated"]:
        print(f"not gated (no entry matches): {len(report['ungated'])} kernel(s)", file=sys.stderr)
    for v in report["violations"]:
        where = f" (loop {v['loop']})" if v["loop"] else ""
        detail = f"; {v['detail']}" if v["detail"] else ""
        print(f"SASS GATE FAILED [{v['entry']}] {v['kernel']}: {v['gate']}: measured {v['measured']}, limit "
              f"{v['limit']}{where}{detail}", file=sys.stderr)
    for u in report["unmatched"]:
        print(f"SASS GATE ERROR: entry {u} matches no kernel", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- report

def resources_markdown(results: list[dict[str, Any]], dem: dict[str, str]) -> list[str]:
    spills = sum(fn["spill_stores"] + fn["spill_loads"] > 0 for r in results for fn in r["functions"])
    lines = [
        f"**Spilling functions: {spills}.** Files: {len(results)}; "
        f"compile errors: {sum(r['returncode'] != 0 for r in results)}; "
        f"warnings: {sum(len(r['warnings']) for r in results)}.", "",
        "## Resources (ptxas -v)", "",
        "Static shared memory only (dynamic shared memory is a launch parameter). Launch bound: "
        "`__launch_bounds__` max threads per block (from the PTX). Max threads by registers: the largest "
        "block the register count lets launch (64K registers per SM, 256-register warp granules, allocated "
        "on 4 sub-partitions). Gate: zero spills.", "",
        "| file | function | arch | registers | stack (B) | spill stores (B) | spill loads (B) | static smem (B) "
        "| barriers | launch bound | max threads by registers |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: r["file"]):
        for fn in sorted(r["functions"], key=lambda f: (not f["entry"], dem.get(f["function"], ""), f["arch"])):
            name = dem.get(fn["function"], fn["function"]).replace("|", "\\|") + ("" if fn["entry"] else " (device fn)")
            flag = " **SPILL**" if fn["spill_stores"] + fn["spill_loads"] else ""
            lines.append(f"| {r['file']} | `{name}`{flag} | {fn['arch']} | {fn['registers']} | {fn['stack']} | "
                         f"{fn['spill_stores']} | {fn['spill_loads']} | {fn['smem']} | {fn['barriers']} | "
                         f"{fn['launch_bound'] or '-'} | {fn['reg_limited_threads'] if fn['entry'] else '-'} |")
        if r["returncode"] != 0:
            lines.append(f"| {r['file']} | **compile error** (see stderr of the tool) |" + " |" * 9)
    if not results:
        lines.append("| (no csrc/cuda/*.cu yet) |" + " |" * 10)
    warn = [(r["file"], w) for r in results for w in r["warnings"]]
    if warn:
        lines += ["", "### Warnings", ""] + [f"- {f}: `{w.strip()}`" for f, w in warn]
    return lines + [""]


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", help="compute capability, e.g. 8.0 (repeatable; default 8.0, 9.0)")
    ap.add_argument("--sass-arch", default=SASS_ARCH, help="the arch whose SASS is gated (default 9.0)")
    ap.add_argument("--no-sass", action="store_true", help="resources only: no disassembly, no SASS gates")
    ap.add_argument("--gates", default=DEFAULT_GATES, help="SASS gate file (default bench/sass_gates.json)")
    ap.add_argument("--files", nargs="*", help="only these .cu files (default: csrc/cuda/*.cu)")
    ap.add_argument("--bare", action="store_true", help="no torch / csrc include flags (standalone .cu files)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes (at most 2)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="Markdown report (default bench/results/cuda_resources.md)")
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument("--no-cache", action="store_true", help="compile afresh (the build/cuda_resources cache unused)")
    ap.add_argument("--require-files", action="store_true", help="exit 3 when there is no .cu file")
    a = ap.parse_args(argv)
    a.arch = a.arch or DEFAULT_ARCHS
    a.jobs = max(1, min(2, a.jobs))
    if not a.no_sass and a.sass_arch not in a.arch:
        ap.error(f"--sass-arch {a.sass_arch} is not one of the compiled archs {a.arch}")
    return a


def run_sass(a: argparse.Namespace, results: list[dict[str, Any]], cache_dir: str,
             dem: dict[str, str]) -> dict[str, Any]:
    """The SASS step: {"arch", "gates_file", "kernels", "gates"} (cuda_sass.check_gates), or {"skipped":
    why} (--no-sass, no nvdisasm, or an error: a bad gate file, SASS the analysis cannot model)."""
    if a.no_sass:
        return {"skipped": "--no-sass"}
    nvdisasm = find_cuda_tool("nvdisasm")
    if not nvdisasm:
        return {"skipped": "no nvdisasm: set CUDA_HOME to a CUDA toolkit, or install triton"}
    arch = "sm_" + a.sass_arch.replace(".", "")
    try:
        gates = cuda_sass.load_gates(a.gates)
        kernels = sass_kernels(nvdisasm, results, cache_dir, arch, dem, a.jobs)
    except cuda_sass.SassError as e:
        return {"skipped": "error", "error": str(e)}
    return {"arch": arch, "gates_file": os.path.relpath(os.path.abspath(a.gates), ROOT), "kernels": kernels,
            "gates": cuda_sass.check_gates(kernels, gates)}


def write_report(a: argparse.Namespace, nvcc: str, results: list[dict[str, Any]], dem: dict[str, str],
                 sass: dict[str, Any]) -> None:
    lines = ["# CUDA kernels: resources and SASS gates", "",
             f"Generated by `python tools/cuda_resource_report.py` with {nvcc_version(nvcc)}, archs "
             f"{', '.join('sm_' + x.replace('.', '') for x in a.arch)}, device code of "
             + ", ".join(f"`{r['file']}`" for r in results) + ".", ""]
    lines += resources_markdown(results, dem)
    if "skipped" in sass:
        lines += ["## SASS gates", "", f"Not run ({_md_escape(sass.get('error', sass['skipped']))}).", ""]
    else:
        lines += cuda_sass.gates_markdown(sass["gates"], sass["gates_file"])
        lines += cuda_sass.kernels_markdown(sass["kernels"], sass["arch"])
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines))
    if a.json:
        public = dict(sass)
        if "kernels" in sass:
            public["kernels"] = [{k: v for k, v in rec.items() if not k.startswith("_")} for rec in sass["kernels"]]
        with open(a.json, "w") as f:
            json.dump({"archs": a.arch, "nvcc": nvcc_version(nvcc), "results": results, "sass": public}, f, indent=1)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.time()
    nvcc = find_nvcc()
    if not nvcc:
        print("cuda_resource_report: no nvcc found (set CUDA_HOME)", file=sys.stderr)
        return EXIT_TOOL
    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    cus = [os.path.abspath(c) for c in a.files or sorted(os.path.join(cuda_dir, f) for f in os.listdir(cuda_dir)
                                                          if f.endswith(".cu"))]
    if not cus and a.require_files:
        print("cuda_resource_report: no csrc/cuda/*.cu", file=sys.stderr)
        return EXIT_TOOL
    flags = nvcc_flags(a.arch) + ([] if a.bare else include_flags())
    with tempfile.TemporaryDirectory(prefix="cuda_resources_") as td:
        cache_dir = td if a.no_cache else CACHE_DIR  # (cubins must outlive the compile for the SASS step)
        with ThreadPoolExecutor(a.jobs) as ex:
            results = list(ex.map(lambda c: compile_one(nvcc, c, a.arch, flags, cache_dir), cus))
        dem = demangle(sorted({fn["function"] for r in results for fn in r["functions"]}))
        sass = run_sass(a, results, cache_dir, dem)
    write_report(a, nvcc, results, dem, sass)

    failed = [r for r in results if r["returncode"] != 0]
    for r in results:
        tag = "cached" if r["cached"] else f"{r['seconds']}s"
        print(f"{r['file']}: {sum(f['entry'] for f in r['functions'])} kernel entries (all archs), "
              f"rc={r['returncode']} ({tag})" + ("\n" + r["errors"] if r["returncode"] else ""), file=sys.stderr)
    spilling = [(r["file"], fn) for r in results for fn in r["functions"] if fn["spill_stores"] + fn["spill_loads"]]
    for file, fn in spilling:
        print(f"SPILL {file}: {fn['function']} {fn['arch']}: {fn['spill_stores']} B stores, "
              f"{fn['spill_loads']} B loads", file=sys.stderr)
    if "gates" in sass:
        print_gate_report(sass["gates"])
        summary = f"{len(sass['gates']['results'])} SASS gate check(s), {len(sass['gates']['violations'])} violation(s)"
    else:
        summary = f"SASS gates not run ({sass.get('error', sass['skipped'])})"
        print(f"cuda_resource_report: {'ERROR' if 'error' in sass else 'WARNING'}: {summary}", file=sys.stderr)
    print(f"cuda_resource_report: {len(cus)} file(s), {len(spilling)} spilling function(s), {summary.splitlines()[0]}, "
          f"{time.time() - t0:.1f}s -> {os.path.relpath(os.path.abspath(a.out), ROOT)}", file=sys.stderr)
    if failed:
        return EXIT_COMPILE
    if "error" in sass or sass.get("gates", {}).get("unmatched"):
        return EXIT_GATES
    return EXIT_FAIL if spilling or sass.get("gates", {}).get("violations") else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
