"""Smoke run of bench/bench_harness.py (correctness only; its timings are not asserted): the harness step and
the bare loop it is timed against do the same work (same weights after the same batches), the timing and
the README block render."""
import os
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
from bench import bench_harness as bh  # noqa: E402


@pytest.mark.parametrize("case", ["digits", "cifar"])
def test_harness_step_equals_the_bare_loop(case):
    assert bh.check_same(case, "cpu", steps=2) <= 1e-6


def test_bare_loop_differs_when_it_should():
    """check_same is not vacuous: a bare loop with another learning rate ends elsewhere."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = bh.Pair("digits", "cpu", 2, d, ["data.augment=false"])
        for g in p.b_opt.param_groups:
            g["lr"] *= 2
        p.harness_steps(2)
        p.bare_steps(2, start=0)
        a, b = p.h_model.state_dict(), p.b_model.state_dict()
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) > 1e-4


def test_measure_and_readme_block(tmp_path):
    r = bh.measure("digits", "cpu", rounds=2, steps=2, warmup=1)
    assert r["harness_img_s"] > 0 and r["bare_img_s"] > 0 and r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]
    assert r["ratio"] == pytest.approx(r["harness_img_s"] / r["bare_img_s"])
    md = tmp_path / "R.md"
    md.write_text(f"a\n{bh.START}\nold\n{bh.END}\nb\n")
    bh.write_readme(str(md), "python bench/bench_harness.py --cases digits", bh.table([r]))
    text = md.read_text()
    assert "old" not in text and "| digits | digits_cnn | 32 |" in text and text.endswith(f"{bh.END}\nb\n")
