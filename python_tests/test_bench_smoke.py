"""Smoke test of the benchmark harness (bench/): the suites run at a tiny size with
``--benchmark-disable`` (each benchmarked step runs once; ``test_agree`` checks that fused and eager
agree on the benchmarked inputs), the peak-memory method measures a known allocation, and the report
generator renders a Markdown table and a PNG from pytest-benchmark JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_suites_smoke():
    # Every case at 7x37 (fp32, bf16; fwd and fwd+bwd; fused and eager) plus the torch.compile code
    # path for one case through the cheap "eager" dynamo backend (inductor would compile for seconds).
    cmd = [sys.executable, "-m", "pytest", "bench/bench_losses.py", "-q", "-p", "no:cacheprovider",
           "--benchmark-disable", "--bench-sizes=smoke", "--bench-compile", "--bench-compile-backend=eager",
           "-k", "not compiled or (LDAM and fwdbwd and fp32)"]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-2000:]


def test_peak_memory_method():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT))
    try:
        from bench.conftest import measure_peak_memory
    finally:
        sys.path.remove(str(ROOT))

    def step():
        a = torch.empty(1000, 1000)  # 4 MB, freed below
        b = torch.ones(250, 1000)  # 1 MB, freed at return
        del a
        return b.sum()

    peak = measure_peak_memory(step)
    assert 5_000_000 <= peak < 5_100_000, peak


def _fake_bench(case, shape, dtype, mode, impl, t, mem=None, suite="losses", inter=None, load=0.0):
    n, c = (int(v) for v in shape.split("x"))
    return {"name": f"test_loss[{case}-{shape}-{dtype}-{mode}-{impl}]", "fullname":
            f"bench/bench_{suite}.py::test_loss[{case}-{shape}-{dtype}-{mode}-{impl}]", "group": f"{suite}: {case}",
            "stats": {"min": t * 0.9, "median": t, "mean": t, "rounds": 5},
            "extra_info": {"suite": suite, "case": case, "shape": shape, "dtype": dtype, "mode": mode,
                           "impl": impl, "peak_mem_bytes": mem, "nc_bytes": n * c * 4,
                           "vs_fused_interleaved": inter, "other_load": load}}


def test_report_renders(tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT))
    try:
        from bench import report
    finally:
        sys.path.remove(str(ROOT))
    benches = []
    for shape in ("256x1000", "512x8142"):
        for case, tf in (("LDAM", 1e-3), ("CE", 2e-3)):
            benches += [_fake_bench(case, shape, "fp32", "fwd+bwd", "fused", tf, 2 * 4_000_000),
                        _fake_bench(case, shape, "fp32", "fwd+bwd", "eager", 12e-3, 3 * 4_000_000,
                                    inter=3.5 if case == "CE" else None),
                        _fake_bench(case, shape, "fp32", "fwd+bwd", "compiled", 4e-3)]
    # a suite by someone else with its own impls, and a benchmark without the extra_info convention
    benches += [_fake_bench("head", "512x8142", "fp32", "fwd+bwd", "fused", 5e-3, suite="cosine_head"),
                _fake_bench("head", "512x8142", "fp32", "fwd+bwd", "gemm3", 4.5e-3, suite="cosine_head"),
                {"name": "test_plain", "fullname": "bench/bench_x.py::test_plain", "group": None,
                 "stats": {"min": 1e-3, "median": 1.1e-3, "mean": 1.2e-3, "rounds": 9}, "extra_info": {}}]
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({"machine_info": {"ltkernels": {"cpu_model": "TestCPU", "cpu_isa": "avx512"}},
                               "commit_info": {"id": "0" * 40}, "datetime": "now", "benchmarks": benches}))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold\n{report.README_END}\nrest\n")
    out = tmp_path / "out"
    assert report.main(["--json", str(raw), "--out", str(out), "--update-readme", str(readme)]) == 0
    md = (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 10_000
    assert "TestCPU" in md and "avx512" in md
    # LDAM 512x8142: 12 ms eager / 1 ms fused = 12x (target 10x met), 4x vs compiled (missed)
    assert "| LDAM | 512x8142 | fp32 | 1.00 | 12.00 | 4.00 | 12.0× | 4.0× | 7.63 (0.5) | 11.4 (0.7) | — |" in md
    assert "≥10× eager ✓, ≥10× compiled ✗" in md
    # CE: the interleaved ratio (3.5x) wins over the ratio of the medians (6x)
    assert "| CE | 512x8142 | fp32 | 2.00 | 12.00 | 4.00 | 3.5× | 2.0× |" in md and "≥3× eager ✓" in md
    assert "suite `cosine_head`" in md and "gemm3 / fused" in md and "test_plain" in md
    assert " ⚠ |" not in md
    # a noisy re-measurement of LDAM eager is flagged, and merging keeps the quieter measurement
    noisy = dict(_fake_bench("LDAM", "512x8142", "fp32", "fwd+bwd", "eager", 50e-3, load=1.5))
    raw2 = tmp_path / "raw2.json"
    raw2.write_text(json.dumps({"benchmarks": [noisy]}))
    assert report.noisy_benchmarks([raw2], 0.3) == [noisy["fullname"]]
    assert report.main(["--json", str(raw), str(raw2), "--out", str(out)]) == 0
    assert " ⚠ |" not in (out / "results.md").read_text()
    assert report.main(["--json", str(raw2), str(raw), "--out", str(out)]) == 0  # quieter one wins either way
    assert " ⚠ |" not in (out / "results.md").read_text()
    raw2.write_text(json.dumps({"benchmarks": [noisy, _fake_bench("LDAM", "512x8142", "fp32", "fwd+bwd", "fused",
                                                                  1e-3)]}))
    assert report.main(["--json", str(raw2), "--out", str(out)]) == 0
    assert "1.5 ⚠" in (out / "results.md").read_text()
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n") and "LDAM" in text


def test_report_reads_interleaved_ratio_recorded_on_the_fused_entry(tmp_path):
    """bench_regularisers.py times the pair from the fused step and records eager / fused there
    (vs_eager_interleaved): the report's ratio and target check use it, not the ratio of the medians."""
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT))
    try:
        from bench import report
    finally:
        sys.path.remove(str(ROOT))
    fused = _fake_bench("uniformity-gaussian", "8142x2048", "fp32", "fwd+bwd", "fused", 2.5, suite="regularisers")
    fused["extra_info"]["vs_eager_interleaved"] = 3.64
    eager = _fake_bench("uniformity-gaussian", "8142x2048", "fp32", "fwd+bwd", "eager", 7.4, suite="regularisers")
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({"benchmarks": [fused, eager]}))
    out = tmp_path / "out"
    assert report.main(["--json", str(raw), "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    # medians give 7.4 / 2.5 = 2.96x (target missed); the interleaved measurement is 3.64x
    assert "| uniformity-gaussian | 8142x2048 | 2500 | 7400 | — | 3.6× | — | ≥3× eager ✓ |" in md
    assert report.main(["--json", str(raw), "--out", str(out), "--ratio", "stat"]) == 0
    assert "| uniformity-gaussian | 8142x2048 | 2500 | 7400 | — | 3.0× | — | ≥3× eager ✗ |" in (out / "results.md").read_text()
