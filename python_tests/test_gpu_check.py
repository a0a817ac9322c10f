"""tools/gpu_check.sh, its test selection (tools/pytest_cuda_only.py) and bench/bench_cuda.py, on the CPU.

The GPU run itself needs a GPU; here: the script's syntax and its --dry-run plan, which tests the selection
keeps, the benchmark's arithmetic (roofline, targets, run order), and a ``--tiny`` benchmark run on the CPU
whose table and JSON are complete and whose fused losses agree with the eager reference. Speed is never
asserted.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
BENCH = os.path.join(ROOT, "bench", "bench_cuda.py")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import bench_cuda as B  # noqa: E402


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, **kw)


# ---- tools/gpu_check.sh ----------------------------------------------------------------------------------


def test_script_syntax():
    p = _run(["bash", "-n", SCRIPT])
    assert p.returncode == 0, p.stderr


def test_dry_run_lists_build_tests_bench_in_order_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    # (without the caller's MAX_JOBS, e.g. CI's 2, to see the script's own default)
    env = {k: v for k, v in os.environ.items() if k != "MAX_JOBS"}
    p = _run(["bash", SCRIPT, str(out), "--dry-run"], env={**env, "PYTHON": sys.executable})
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()

    def step(name: str) -> tuple[int, str]:
        hits = [(i, ln) for i, ln in enumerate(lines) if ln.startswith(f"[dry-run] {name}")]
        assert hits, f"no {name} step in:\n{p.stdout}"
        return hits[0]

    (ib, build), (it, tests), (ibench, bench) = step("build"), step("tests"), step("bench")
    ihead, head = step("head")
    assert ib < it < ibench < ihead
    assert f"bench/bench_cuda_head.py --out {out} --budget" in head and head.endswith(f"> {out}/head.log")
    assert "setup.py build_ext --inplace" in build and "TORCH_CUDA_ARCH_LIST=" in build and "MAX_JOBS=16" in build
    assert "LTK_BUILD_CUDA=1" in build and build.endswith(f"> {out}/build.log")
    assert "-m pytest python_tests" in tests and "-p pytest_cuda_only" in tests
    assert f"--junitxml={out}/tests.xml" in tests and tests.endswith(f"> {out}/tests.log")
    assert f"bench/bench_cuda.py --out {out} --budget" in bench and bench.endswith(f"> {out}/bench.log")
    assert f"{out}/env.txt" in step("env")[1] and f"{out}/summary.md" in step("summary")[1]
    assert not out.exists(), "--dry-run created the output directory"


def test_usage_errors():
    assert _run(["bash", SCRIPT]).returncode == 2
    assert _run(["bash", SCRIPT, "a", "b"]).returncode == 2
    assert _run(["bash", SCRIPT, "a", "--frobnicate"]).returncode == 2


# ---- tools/pytest_cuda_only.py -----------------------------------------------------------------------------

SELECTION_CASES = '''
import pytest
import torch


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_device(device):
    pass


@pytest.mark.parametrize("dev", [torch.device("cpu"), torch.device("cuda", 0)], ids=["tcpu", "tcuda"])
@pytest.mark.parametrize("dtype", ["f32"])
def test_torch_device(dtype, dev):
    pass


@pytest.mark.parametrize("dev", ["cuda:1"])
def test_device_index(dev):
    pass


@pytest.mark.skipif(False, reason="needs a CUDA device")
def test_gpu_only():
    pass


@pytest.mark.cuda
def test_marked():
    pass


@pytest.mark.skipif(False, reason="no nvcc: set CUDA_HOME to a CUDA toolkit")
def test_toolkit_only():
    pass


def test_cuda_in_the_name_only():
    pass
'''


def test_selection_keeps_exactly_the_tests_that_run_on_cuda(tmp_path):
    (tmp_path / "test_sel.py").write_text(SELECTION_CASES)
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "tools")}
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "-p", "pytest_cuda_only", "-W", "ignore::pytest.PytestUnknownMarkWarning", "test_sel.py"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    kept = {ln.split("::", 1)[1] for ln in p.stdout.splitlines() if ln.startswith("test_sel.py::")}
    assert kept == {"test_device[cuda]", "test_torch_device[f32-tcuda]", "test_device_index[cuda:1]",
                    "test_gpu_only", "test_marked"}
    assert "pytest_cuda_only: 5 tests that run on CUDA selected" in p.stdout


# ---- bench/bench_cuda.py: arithmetic -------------------------------------------------------------------------


def test_roofline_and_targets():
    bw = B.table_bandwidth("NVIDIA H200")
    assert bw == 4.8e12 and B.table_bandwidth("NVIDIA H100 PCIe") is None
    big = B.Row("LDAM", 8192, 100000, "bf16", impls={"fused": B.Measurement(us=1000.0)})
    # read + write 8192 x 100000 bf16 = 3.2768 GB, 0.6827 ms at 4.8 TB/s
    assert big.roofline_pct(bw) == pytest.approx(100 * 2 * 8192 * 100000 * 2 / 4.8e12 / 1e-3)
    mid = B.Row("GCL", 512, 8142, "fp32", impls={"fused": B.Measurement(us=10.0), "eager": B.Measurement(us=60.0),
                                                  "compiled": B.Measurement(skipped="compile off")})
    tg = {t["target"]: t for t in B.targets([big, mid], bw)}
    assert tg["LDAM 8192x100000 bf16 fused fwd+bwd >= 70% of HBM roofline"]["met"] is False
    assert tg["GCL 512x8142 fp32 fused >= 5x eager"]["value"] == pytest.approx(6.0)
    assert tg["GCL 512x8142 fp32 fused >= 5x eager"]["met"] is True
    assert tg["GCL 512x8142 fp32 fused >= 2x compiled"]["value"] is None


def test_run_order_puts_the_target_rows_first():
    opts = B.Options(shapes=list(B.SHAPES), dtypes=list(B.DTYPES), losses=list(B.LOSSES), compile=True)
    order = B.run_order(opts)
    assert len(order) == len(B.SHAPES) * len(B.DTYPES) * len(B.LOSSES)
    assert {o[1] for o in order[:6]} == {(512, 8142)}
    assert {(o[1], o[2]) for o in order[6:9]} == {((8192, 100000), "bf16")}


# ---- bench/bench_cuda.py --tiny on the CPU ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_cuda")
    p = _run([sys.executable, BENCH, "--tiny", "--out", str(out)])
    return p, out


def test_tiny_run_writes_table_and_json(tiny_run):
    p, out = tiny_run
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads((out / "bench_cuda.json").read_text())
    assert doc["meta"]["complete"] and doc["meta"]["timer"] == "perf_counter"
    rows = doc["rows"]
    assert {(r["loss"], r["dtype"]) for r in rows} == {(loss, d) for loss in B.LOSSES for d in B.DTYPES}
    assert all(r["shape"] == list(B.TINY_SHAPES[0]) for r in rows)
    for r in rows:
        for impl in ("fused", "eager"):
            us = r[impl]["us"]
            assert math.isfinite(us) and us > 0, (r["loss"], r["dtype"], impl, us)
            assert r[impl]["repeats"] >= 3
        assert r["compiled"]["skipped"]  # --tiny: no compile
        assert math.isfinite(r["speedup_vs_eager"]) and r["roofline_pct"] > 0

    md = (out / "bench_cuda.md").read_text().splitlines()
    header = "| " + " | ".join(B.MD_COLUMNS) + " |"
    assert header in md
    table = md[md.index(header) + 2:]
    table = table[:next(i for i, ln in enumerate(table) if not ln.startswith("|"))]
    assert len(table) == len(rows)
    for ln in table:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == len(B.MD_COLUMNS)
        fused, eager = float(cells[3]), float(cells[4])
        assert fused > 0 and eager > 0 and cells[5] == "skipped"
    # one progress line per row
    assert sum(ln.startswith("[") and "/6]" in ln for ln in p.stdout.splitlines()) == 6


def test_tiny_run_fused_agrees_with_the_eager_reference(tiny_run):
    p, out = tiny_run
    for r in json.loads((out / "bench_cuda.json").read_text())["rows"]:
        a = r["agree"]
        tol_loss, tol_grad = B.AGREE_TOL[r["dtype"]]
        assert a["ok"], (r["loss"], r["dtype"], a)
        assert abs(a["fused_loss"] - a["reference_loss"]) <= tol_loss * max(1.0, abs(a["reference_loss"]))
        assert a["grad_err"] <= tol_grad
        assert math.isfinite(a["fused_loss"]) and a["fused_loss"] > 0


def test_budget_spent_leaves_rows_out_but_writes_the_files(tmp_path):
    p = _run([sys.executable, BENCH, "--tiny", "--out", str(tmp_path), "--budget", "0", "--losses", "CE"])
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads((tmp_path / "bench_cuda.json").read_text())
    assert doc["rows"] == [] and doc["meta"]["rows_left_out"] == 2 and not doc["meta"]["complete"]
    assert "Incomplete run" in (tmp_path / "bench_cuda.md").read_text()


# ---- bench/bench_cuda_head.py --tiny on the CPU -------------------------------------------------------------
HEAD_BENCH = os.path.join(ROOT, "bench", "bench_cuda_head.py")


def test_head_tiny_run_writes_rows_that_agree(tmp_path):
    from bench import bench_cuda_head as H

    p = _run([sys.executable, HEAD_BENCH, "--tiny", "--out", str(tmp_path)])
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads((tmp_path / "bench_cuda_head.json").read_text())
    assert doc["meta"]["complete"]
    rows = doc["rows"]
    assert {(r["loss"], r["dtype"]) for r in rows} == {(loss, d) for loss in H.LOSSES for d in H.DTYPES}
    for r in rows:
        for impl in H.IMPLS:
            assert math.isfinite(r[impl]["us"]) and r[impl]["us"] > 0, (r["loss"], r["dtype"], impl)
        a = r["agree"]
        tol_loss, tol_grad = B.AGREE_TOL[r["dtype"]]
        assert a["ok"] and a["loss_err"] <= tol_loss and max(a["dx_err"], a["dw_err"]) <= tol_grad, a
        assert math.isfinite(a["chunked_loss"]) and a["chunked_loss"] > 0
    md = (tmp_path / "bench_cuda_head.md").read_text()
    assert "| " + " | ".join(H.MD_COLUMNS) + " |" in md
    assert sum(ln.startswith("|") and "x16x" in ln for ln in md.splitlines()) == len(rows)


def test_head_memory_target_arithmetic():
    from bench import bench_cuda_head as H

    (n, d, c), limit = H.MEMORY_TARGET
    r = H.HeadRow("LDAM", n, c, "bf16", D=d)
    r.impls = {"chunked": B.Measurement(us=1.0, peak_bytes=100), "eager": B.Measurement(us=9.0, peak_bytes=2000)}
    (t,) = H.targets([r])
    assert t["value"] == 0.05 and t["met"] is True and r.ratio("eager", "chunked", "us") == 9.0
    r.impls["chunked"].peak_bytes = 400  # 20% of eager's
    assert H.targets([r])[0]["met"] is False

