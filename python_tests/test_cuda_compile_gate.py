"""Compile gate: every csrc/cuda/*.cu compiles for the default archs (sm_80, sm_90) with no register
spills (tools/cuda_resource_report.py --no-sass; the SASS gates of the same tool are
test_cuda_sass_gate.py's; the report goes to bench/results/cuda_resources.md when the tool is run by
hand). Needs nvcc, not a GPU. Cached by content, so an unchanged tree checks in a few seconds."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import cuda_resource_report as crr  # noqa: E402

CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def test_ptxas_parser():
    log = """ptxas info    : 125 bytes gmem
ptxas info    : Compiling entry function '_Z1kPf' for 'sm_80'
ptxas info    : Function properties for _Z1kPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 380 bytes cmem[0]
ptxas info    : Function properties for _Z3devi
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'
ptxas info    : Function properties for _Z1kPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 38 registers, used 1 barriers, 1024 bytes smem, 380 bytes cmem[0]
"""
    rows = {(r["function"], r["arch"]): r for r in crr.parse_ptxas(log)}
    k80, k90 = rows[("_Z1kPf", "sm_80")], rows[("_Z1kPf", "sm_90")]
    assert (k80["registers"], k80["spill_stores"], k80["spill_loads"], k80["smem"], k80["barriers"]) == (40, 4, 12, 1024, 1)
    assert (k90["registers"], k90["spill_stores"] + k90["spill_loads"]) == (38, 0)
    assert rows[("_Z3devi", "sm_80")]["entry"] is False and rows[("_Z3devi", "sm_80")]["stack"] == 16


@pytest.mark.slow
@pytest.mark.skipif(crr.find_nvcc() is None, reason="no nvcc: set CUDA_HOME to a CUDA toolkit to run the compile gate")
@pytest.mark.skipif(not CU_FILES, reason="no csrc/cuda/*.cu yet")
def test_cuda_sources_compile_without_spills(tmp_path):
    js = tmp_path / "r.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cuda_resource_report.py"),
                        "--no-sass", "--out", str(tmp_path / "r.md"), "--json", str(js)],
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode in (0, 1), f"a .cu failed to compile:\n{p.stderr[-6000:]}"
    res = json.loads(js.read_text())
    spills = [(r["file"], fn["function"], fn["arch"], fn["spill_stores"], fn["spill_loads"])
              for r in res["results"] for fn in r["functions"] if fn["spill_stores"] + fn["spill_loads"]]
    assert not spills, f"register spills: {spills}"
    assert p.returncode == 0
    archs = {fn["arch"] for r in res["results"] for fn in r["functions"] if fn["entry"]}
    assert archs == {"sm_80", "sm_90"}, archs
    for r in res["results"]:
        assert any(fn["entry"] for fn in r["functions"]), f"{r['file']}: no __global__ kernel compiled"
