"""Deliberately broken copies of the real CUDA kernels must fail the emulation tests.

Each mutant (python_tests/emu/mutants.py) shadows one project header with a copy containing one bug (a
removed __syncthreads, a shifted index, a lost tail, a dropped clamp), is built into its own emulation
library and runs a subset of test_emulation_kernels.py in a subprocess (about 25 s each on 2 cores).
By default one representative mutant runs (a __syncthreads removed from the block reduction that
margin_ce uses); LTK_EMU_MUTANTS=all runs every one, LTK_EMU_MUTANTS=name1,name2 a selection. Mutants with a
``match`` pattern (those only the sanitizer can kill) must fail with that message:

    LTK_EMU_MUTANTS=all python -m pytest python_tests/test_emulation_mutants.py -q
    python python_tests/emu/mutants.py          # the same as a table
"""
from __future__ import annotations

import os

import pytest

from emu import mutants

_sel = os.environ.get("LTK_EMU_MUTANTS", "")
SELECTED = list(mutants.MUTANTS) if _sel == "all" else \
    ([n for n in _sel.split(",") if n] or ["block_reduce_no_barrier_before_read"])


@pytest.mark.slow
@pytest.mark.parametrize("name", SELECTED)
def test_mutant_is_killed(name):
    m = mutants.MUTANTS[name]
    r = mutants.run(name)
    if r["status"] == "n/a":
        pytest.skip(r["detail"])
    if r["status"] == "skipped":
        pytest.skip(f"the tests selected for {name} were skipped (e.g. no nvcc): {m['k']}")
    assert not r["status"].startswith(("error", "build error")), r["output"][-4000:]
    if m["expect"] == "killed":
        assert r["status"] == "killed", f"mutant {name} {r['status']}: {m['why']}\n{r['output'][-3000:]}"
    else:  # an equivalent mutant: documents a redundant line; either outcome is acceptable
        assert r["status"] in ("killed", "survived")
