"""Mutation check of the real CUDA kernels under the SIMT emulator.

Each mutant is one deliberate bug (a removed __syncthreads, a shifted index, a lost tail, a dropped
clamp) in a copy of a project header. The copy is placed in a scratch directory that is searched before
csrc/, so it shadows the original for a separately built emulation library; a subset of
test_emulation_kernels.py then runs against it in a subprocess. A mutant is *killed* when those tests
fail. Run all of them (about 15 s each on 2 cores):

    python python_tests/emu/mutants.py              # table of killed / survived
    python python_tests/emu/mutants.py NAME ...     # only these

python_tests/test_emulation_mutants.py asserts that every mutant marked "killed" is killed, and, for a
mutant with a ``match`` pattern, that the failure says so (the sanitizer's mutants keep the kernel's result
right: only racecheck can kill them, and the message proves it did). A mutant whose source pattern no
longer exists (the kernel changed) is reported as n/a rather than failing.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))

# name -> (project file, path it is included as, text to find, replacement, pytest -k, sources, expected)
MUTANTS = {
    "block_reduce_no_barrier_before_read": dict(
        file="csrc/include/ltk/block_reduce.cuh", include_as="ltk/block_reduce.cuh",
        find="  if (lane == 0) scratch[warp] = v;\n  __syncthreads();\n",
        replace="  if (lane == 0) scratch[warp] = v;\n",
        k="test_margin_ce_shapes_dtypes", sources="margin_ce.cpp", expect="killed",
        why="the per-warp partials are read before every warp has written them"),
    "block_reduce_no_barrier_before_reuse": dict(
        file="csrc/include/ltk/block_reduce.cuh", include_as="ltk/block_reduce.cuh",
        find="  __syncthreads();                       // scratch may be reused by the next reduction\n",
        replace="",
        k="test_margin_ce_shapes_dtypes or test_margin_ce_features", sources="margin_ce.cpp", expect="killed",
        why="a fast warp overwrites a partial of the next reduction that a slow warp has not read yet"),
    "margin_ce_pass1_start_shifted": dict(
        file="csrc/cuda/margin_ce_kernels.cuh", include_as="cuda/margin_ce_kernels.cuh",
        find="  acc_t m = -INFINITY, s = 0;\n  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {",
        replace="  acc_t m = -INFINITY, s = 0;\n  for (int64_t g = threadIdx.x + 1; g < groups; g += blockDim.x) {",
        k="test_margin_ce_shapes_dtypes", sources="margin_ce.cpp", expect="killed",
        why="an index shifted by one: column group 0 is left out of the softmax normaliser"),
    "margin_ce_grad_index_shifted": dict(
        file="csrc/cuda/margin_ce_kernels.cuh", include_as="cuda/margin_ce_kernels.cuh",
        find="if (grow) grow[j] = ", replace="if (grow) grow[j + 1] = ",
        k="test_margin_ce_shapes_dtypes", sources="margin_ce.cpp", expect="killed",
        why="the gradient is written one column to the right (past the end of the last row)"),
    "margin_ce_tail_groups_lost": dict(
        file="csrc/cuda/margin_ce_kernels.cuh", include_as="cuda/margin_ce_kernels.cuh",
        find="const int64_t groups = (C + 3) / 4;\n  const int64_t y", replace="const int64_t groups = C / 4;\n  const int64_t y",
        k="test_margin_ce_shapes_dtypes", sources="margin_ce.cpp", expect="killed",
        why="the last C mod 4 columns are never visited"),
    "margin_ce_no_thread_cap": dict(
        file="csrc/cuda/margin_ce_kernels.cuh", include_as="cuda/margin_ce_kernels.cuh",
        find="  if (t > kMarginCeMaxThreads) t = kMarginCeMaxThreads;\n", replace="",
        k="test_launch_configs_fit_compiled_resources", sources="margin_ce.cpp,cosine_head.cpp,uniformity.cpp",
        expect="killed", match=r"(threads > __launch_bounds__ 256|invalid launch configuration.*blockDim exceeds)",
        why="blocks above __launch_bounds__(256): correct on the CPU, a launch failure on a GPU (needs nvcc)"),
    "margin_ce_redundant_barrier_removed": dict(
        file="csrc/cuda/margin_ce_kernels.cuh", include_as="cuda/margin_ce_kernels.cuh",
        find="  __syncthreads();  // target_logit was written", replace="  // target_logit was written",
        k="test_margin_ce_shapes_dtypes or test_margin_ce_features", sources="margin_ce.cpp", expect="equivalent",
        why="the block reductions' own barriers already order target_logit: removing this one is harmless"),
    "cosine_col_dot_no_barrier_before_next_tile": dict(
        file="csrc/cuda/cosine_head_kernels.cuh", include_as="cuda/cosine_head_kernels.cuh",
        find="    __syncthreads();  // part is rewritten by the next tile\n", replace="",
        k="test_cosine_vec_dot", sources="cosine_head.cpp", expect="killed",
        why="the next tile's partial sums overwrite `part` while row 0 still adds up the previous tile "
            "(only visible when the grid-stride loop wraps: the clamped_grid cases)"),
    # -- only the sanitizer can kill these (the results stay right) --
    "cosine_col_dot_every_row_writes": dict(
        file="csrc/cuda/cosine_head_kernels.cuh", include_as="cuda/cosine_head_kernels.cuh",
        find="    if (threadIdx.y == 0 && col < cols) {", replace="    if (col < cols) {",
        k="test_cosine_vec_dot", sources="cosine_head.cpp", expect="killed",
        match=r"data race on guarded global buffer .* write by block \(\d+,0,0\) thread \(\d+,\d,0\) .* at "
              r"cuda/cosine_head_kernels.cuh:\d+ .*and .*write by block \(\d+,0,0\) thread \(\d+,\d,0\) .*"
              r"not ordered by a barrier",
        why="all 8 thread rows of a column tile write the (same) column sum: 8 unordered writers of one output"),
    "block_reduce_every_lane_writes_partial": dict(
        file="csrc/include/ltk/block_reduce.cuh", include_as="ltk/block_reduce.cuh",
        find="  if (lane == 0) scratch[warp] = v;\n", replace="  scratch[warp] = v;\n",
        k="test_margin_ce_shapes_dtypes", sources="margin_ce.cpp", expect="killed",
        match=r"data race on shared memory `margin_ce_kernel<[^`]*>::red` .* at ltk/block_reduce.cuh:\d+ .*"
              r"not ordered by a barrier, a warp collective or an atomic",
        why="every lane of a warp writes its warp's partial (the same value) after the last shuffle: 32 "
            "unordered writers of one shared slot"),
    "cosine_row_dot_lane_shifted": dict(
        file="csrc/cuda/cosine_head_kernels.cuh", include_as="cuda/cosine_head_kernels.cuh",
        find="    for (int64_t j = lane; j < cols; j += 32) acc += ar[j] * br[j];",
        replace="    for (int64_t j = lane + 1; j < cols; j += 32) acc += ar[j] * br[j];",
        k="test_cosine_vec_dot or test_cosine_norms", sources="cosine_head.cpp", expect="killed",
        why="an index shifted by one: column 0 of every row is skipped"),
}


def run(name: str, timeout: int = 900) -> dict:
    m = MUTANTS[name]
    src_path = os.path.join(ROOT, m["file"])
    with open(src_path) as f:
        src = f.read()
    if m["find"] not in src:
        return {"name": name, "status": "n/a", "detail": f"pattern not found in {m['file']} (kernel changed)"}
    scratch = os.path.join(HERE, "build", "mutants", name)
    os.makedirs(os.path.join(scratch, os.path.dirname(m["include_as"])), exist_ok=True)
    with open(os.path.join(scratch, m["include_as"]), "w") as f:
        f.write(f"// MUTANT {name}: {m['why']}\n#line 1 \"{m['file']}\"\n" + src.replace(m["find"], m["replace"], 1))
    env = dict(os.environ, LTK_EMU_EXTRA_INCLUDE=scratch, LTK_EMU_BUILD_DIR=os.path.join(scratch, "build"),
               LTK_EMU_SOURCES="api.cpp," + m["sources"])
    cmd = [sys.executable, "-m", "pytest", os.path.join(ROOT, "python_tests", "test_emulation_kernels.py"), "-x",
           "-q", "-p", "no:cacheprovider", "-k", m["k"], "-W", "ignore"]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    out = p.stdout + p.stderr
    if "emulation build failed" in out or "emulation link failed" in out:
        status = "build error"  # not a kill: the mutant (or the tree) does not compile
    elif p.returncode == 1:
        status = "killed"
    elif p.returncode == 0:
        status = "skipped" if " passed" not in out else "survived"
    else:
        status = f"error (pytest exit {p.returncode})"
    detail = ""
    for line in out.splitlines():
        if line.startswith(("E  ", "FAILED")):
            detail = line.strip()[:300]
            break
    if status == "killed" and m.get("match") and not re.search(m["match"], out):
        status = "killed (other reason)"  # e.g. a wrong result where racecheck should have spoken
    return {"name": name, "status": status, "expect": m["expect"], "seconds": round(time.time() - t0, 1),
            "detail": detail, "output": out}


def main(argv: list[str]) -> int:
    names = argv or list(MUTANTS)
    bad = 0
    for n in names:
        r = run(n)
        ok = r["status"] == "n/a" or (r["status"] == "killed") == (MUTANTS[n]["expect"] == "killed")
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {n:48s} {r['status']:10s} (expected {MUTANTS[n]['expect']}, "
              f"{r.get('seconds', 0)}s) {r['detail']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
