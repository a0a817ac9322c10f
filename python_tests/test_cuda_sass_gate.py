"""SASS gate (tools/cuda_sass.py, run by tools/cuda_resource_report.py): the nvdisasm parser, the loop
finder and the gate checks on hand-written SASS, the occupancy model and the gate file (no CUDA tool
needed); then the fixtures of python_tests/sass_fixtures compiled for sm_90 through the command line: the
good kernel passes the fixture gate and each bad kernel fails exactly the gate it is written to break (so
a broken gate is seen to fail); last, csrc/cuda/*.cu against bench/sass_gates.json. The compiling tests
need nvcc and nvdisasm (a CUDA toolkit's, or the copy triton bundles), not a GPU."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from typing import Any

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import cuda_resource_report as crr  # noqa: E402
import cuda_sass as sass  # noqa: E402

TOOL = os.path.join(ROOT, "tools", "cuda_resource_report.py")
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sass_fixtures")
FIXTURE_FILES = [os.path.join(FIXTURES, f) for f in ("softmax_good.cu", "softmax_bad.cu")]
HAVE_TOOLS = crr.find_nvcc() is not None and crr.find_cuda_tool("nvdisasm") is not None
needs_cuda_tools = pytest.mark.skipif(not HAVE_TOOLS, reason="needs nvcc and nvdisasm (set CUDA_HOME to a CUDA "
                                      "toolkit; triton bundles nvdisasm)")

# One gate for every fixture kernel: the stream kernels' gates, scaled to a kernel that does little per element.
FIXTURE_GATE: dict[str, Any] = {
    "name": "fixtures", "kernel": r"^softmax_", "elems_per_iter": {"load_bytes": 4}, "max_instr_per_elem": 10,
    "max_ex2_per_elem": 1, "require": ["LDG.E.128", "STG.E.128"], "max_spills": 0, "forbid_local_in_loops": True,
    "min_occupancy": 0.5, "block": 256,
}
# kernel -> the gates it must fail (and no other)
EXPECTED_FAILURES = {
    "softmax_good": set(),
    "softmax_bad_expf": {"max_instr_per_elem"},
    "softmax_bad_scalar": {"require"},
    "softmax_bad_local": {"forbid_local_in_loops"},
    "softmax_bad_ex2_twice": {"max_ex2_per_elem"},
    "softmax_bad_occupancy": {"min_occupancy"},
    "softmax_bad_spill": {"max_spills", "forbid_local_in_loops"},  # a spill is local memory, here in the loop
}

_HEAD = """//--------------------- .text.{0} --------------------------
\t.section\t.text.{0},"ax",@progbits
{0}:
.text.{0}:
"""
_TAIL = "//--------------------- .nv.constant0.{0} --------------------------\n"

# An inner loop (0x50-0xd0) in an outer one (0x40-0x120), the end-of-function `BRA self` and NOP padding.
SASS_NESTED = _HEAD.format("t") + """\t//## File "/src/t.cu", line 3
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R8, SR_TID.X ;
        /*0020*/                   ISETP.GE.AND P0, PT, R8, UR7, PT ;
        /*0030*/               @P0 EXIT ;
.L_x_1:
        /*0040*/                   MOV R9, RZ ;
.L_x_0:
\t//## File "/src/t.cu", line 6
        /*0050*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0060*/                   FADD R4, R4, -R0 ;
        /*0070*/                   MUFU.EX2 R4, R4 ;
        /*0080*/                   MUFU.EX2 R5, R5 ;
        /*0090*/                   MUFU.RCP R6, R6 ;
        /*00a0*/                   STG.E.128 desc[UR4][R10.64], R4 ;
        /*00b0*/                   LDL R12, [R1] ;
        /*00c0*/                   ISETP.GE.AND P1, PT, R9, UR7, PT ;
\t//## File "/src/t.cu", line 5
        /*00d0*/              @!P1 BRA `(.L_x_0) ;
\t//## File "/src/t.cu", line 8
        /*00e0*/                   LDG.E R13, desc[UR4][R2.64] ;
        /*00f0*/                   STG.E.U16 desc[UR4][R10.64], R13 ;
        /*0100*/                   IADD3 R8, R8, UR6, RZ ;
        /*0110*/                   ISETP.GE.AND P0, PT, R8, UR7, PT ;
\t//## File "/src/t.cu", line 4
        /*0120*/              @!P0 BRA `(.L_x_1) ;
        /*0130*/                   EXIT ;
.L_x_2:
        /*0140*/                   BRA `(.L_x_2);
        /*0150*/                   NOP;
""" + _TAIL.format("t")

# A loop at 0x20-0x40; an out-of-line block (0x60) that branches back to 0x20 without being dominated by it
# (no loop: an address-range test would say it is one); a local subroutine after EXIT, reached by CALL, with
# a loop of its own (a predicate-operand branch).
SASS_LABELS = _HEAD.format("k") + """\t//## File "/src/k.cu", line 10
        /*0000*/                   ISETP.GE.AND P0, PT, R8, UR7, PT ;
        /*0010*/               @P0 BRA `(.L_x_1) ;
.L_x_0:
\t//## File "/src/k.cu", line 12
        /*0020*/                   LDG.E.64 R4, desc[UR4][R2.64] ;
        /*0030*/                   CALL.REL.NOINC `($k$slowpath) ;
\t//## File "/src/k.cu", line 11
        /*0040*/               @P1 BRA `(.L_x_0) ;
        /*0050*/                   EXIT ;
.L_x_1:
\t//## File "/src/k.cu", line 20
        /*0060*/                   FMUL R4, R4, R4 ;
        /*0070*/                   BRA `(.L_x_0) ;
$k$slowpath:
.L_x_3:
\t//## File "/src/cmath", line 7
        /*0080*/                   FFMA R4, R4, R4, R5 ;
        /*0090*/                   BRA P2, `(.L_x_3) ;
        /*00a0*/                   RET.REL.NODEC R20 `(k) ;
.L_x_4:
        /*00b0*/                   BRA `(.L_x_4);
""" + _TAIL.format("k")

# A cycle with two entries (0x10 and 0x20): irreducible, so no natural loop holds its local load.
SASS_IRREDUCIBLE = _HEAD.format("k") + """        /*0000*/               @P0 BRA `(.L_x_1) ;
.L_x_0:
        /*0010*/                   FADD R4, R4, R5 ;
.L_x_1:
        /*0020*/                   LDL R6, [R1] ;
        /*0030*/               @P1 BRA `(.L_x_0) ;
        /*0040*/                   EXIT ;
""" + _TAIL.format("k")

PTXAS_ROW = {"registers": 32, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0, "launch_bound": 256}


def _record(text: str, name: str) -> dict[str, Any]:
    (rec,) = sass.analyse(text, {name: dict(PTXAS_ROW)}, "sm_90", "t.cu", {})
    return rec


def test_nested_loops_and_their_own_counts():
    ins = sass.parse_nvdisasm(SASS_NESTED)["t"]
    assert len(ins) == 22 and ins[3].guard == "P0" and ins[13].target == 0x50 and ins[20].target == 0x140
    assert sass.reachable_count(ins) == 20  # not the trailing BRA self and NOP
    loops, irreducible = sass.find_loops(ins)
    assert irreducible == 0
    outer, inner = loops
    assert (inner.header, inner.depth, inner.inner_loops, inner.src) == (0x50, 2, 0, "t.cu:5")
    assert (outer.header, outer.depth, outer.inner_loops, outer.src) == (0x40, 1, 1, "t.cu:4")
    s = inner.summary
    assert (s["instructions"], s["ex2"], s["mufu_other"]) == (9, 2, {"RCP": 1})
    assert (s["ldg_bits"], s["stg_bits"], s["ldg_bytes"], s["ldl"], s["stl"]) == ({"128": 1}, {"128": 1}, 16, 1, 0)
    o = outer.summary  # the outer loop's own instructions: its body less the inner loop
    assert (outer.body_size, o["instructions"], o["ex2"], o["ldg_bits"], o["stg_bits"]) == \
        (15, 6, 0, {"32": 1}, {"16": 1})
    assert sass.hottest(loops) is inner


def test_out_of_line_block_is_no_loop_and_subroutines_are_roots():
    ins = sass.parse_nvdisasm(SASS_LABELS)["k"]
    assert [i.target for i in ins if i.base in ("BRA", "CALL")] == [0x60, 0x80, 0x20, 0x20, 0x80, 0xB0]
    assert ins[2].src == "k.cu:12" and ins[4].src == "k.cu:11"
    loops, irreducible = sass.find_loops(ins)
    assert irreducible == 0
    assert [(lp.header, lp.src, lp.summary["instructions"]) for lp in loops] == [(0x20, "k.cu:11", 3),
                                                                                 (0x80, "cmath:7", 2)]
    assert loops[0].summary["call"] == 1 and loops[0].summary["ldg_bits"] == {"64": 1}


def test_irreducible_cycle_fails_the_loop_gates():
    rec = _record(SASS_IRREDUCIBLE, "k")
    assert (rec["loops"], rec["irreducible_edges"]) == ([], 1)
    res = sass.evaluate_gate(rec, {"name": "g", "kernel": "k", "forbid_local_in_loops": True, "max_spills": 0})
    assert {r["gate"]: r["ok"] for r in res} == {"cfg": False, "forbid_local_in_loops": True, "max_spills": True}


@pytest.mark.parametrize("line,error", [
    ("        /*0000*/                   BRA `(.L_x_9) ;", "unresolved target"),
    ("        /*0000*/                   BRX R4 -0x10 ;", "indirect branch"),
])
def test_unanalysable_sass_is_an_error(line, error):
    with pytest.raises(sass.SassError, match=error):
        sass.parse_nvdisasm(_HEAD.format("k") + line + "\n" + _TAIL.format("k"))


def test_indirect_branch_fails_only_the_loop_gates():
    """A kernel with a jump table (BRX: nvcc emits one for some switches) has no known loops: every gate on
    its loops fails, naming the branch, and its other checks (spills, occupancy) still run."""
    text = _HEAD.format("k") + """        /*0000*/                   BRX R4 -0x10 ;
        /*0010*/                   EXIT ;
""" + _TAIL.format("k")
    rec = _record(text, "k")
    assert rec["loops"] == [] and "indirect branch BRX" in rec["unanalysable"]
    spills = sass.evaluate_gate(rec, {"name": "g", "kernel": "k", "max_spills": 0, "min_occupancy": 0.5})
    assert [(r["gate"], r["ok"]) for r in spills] == [("max_spills", True), ("min_occupancy", True)]
    loops = sass.evaluate_gate(rec, {"name": "g", "kernel": "k", "max_spills": 0, "forbid_local_in_loops": True,
                                     "elems_per_iter": 4, "max_instr_per_elem": 40})
    assert [(r["gate"], r["ok"]) for r in loops] == [("cfg", False), ("max_spills", True)]
    assert "indirect branch" in loops[0]["detail"]


def test_gate_checks_on_the_nested_loops():
    rec = _record(SASS_NESTED, "t")
    assert rec["local_in_loops"] == 1 and rec["loops"][rec["hottest_loop"]]["header"] == "0x0050"
    gate = {"name": "g", "kernel": "t", "elems_per_iter": {"op": "LDG.E.128", "per_op": 4}, "max_instr_per_elem": 2,
            "max_ex2_per_elem": 0.5, "min_ex2_per_elem": 0.5, "require": ["STG.E.128"],
            "forbid_local_in_loops": True, "min_occupancy": 1}
    by_gate = {r["gate"]: r for r in sass.evaluate_gate(rec, gate)}
    assert (by_gate["max_instr_per_elem"]["measured"], by_gate["max_instr_per_elem"]["ok"]) == (2.25, False)
    assert by_gate["max_ex2_per_elem"]["ok"] and by_gate["min_ex2_per_elem"]["ok"]
    assert by_gate["require"]["ok"] and by_gate["require"]["loop"] == "t.cu:5"
    assert not by_gate["forbid_local_in_loops"]["ok"]
    assert by_gate["min_occupancy"]["ok"]  # 32 registers, 256 threads: 100 %
    # "lacks" selects the outer loop, whose own instructions hold the 4-byte load and the 2-byte store
    outer = dict(gate, loop={"lacks": ["LDG.E.128"]}, elems_per_iter=1, max_instr_per_elem=6, require=["STG.E.U16"])
    outer.pop("min_ex2_per_elem"), outer.pop("max_ex2_per_elem")
    assert {r["gate"] for r in sass.evaluate_gate(rec, outer) if not r["ok"]} == {"forbid_local_in_loops"}
    none = {"name": "g", "kernel": "t", "loop": {"has": ["LDG.E.128"], "lacks": ["MUFU"]}, "require": ["LDG"]}
    assert [(r["gate"], r["ok"]) for r in sass.evaluate_gate(rec, none)] == [("loop", False)]
    zero = dict(gate, elems_per_iter={"op": "LDG.E.64", "per_op": 2})
    assert [(r["gate"], r["ok"]) for r in sass.evaluate_gate(rec, zero)][0] == ("elems_per_iter", False)
    rep = sass.check_gates([rec], [gate, dict(gate, name="renamed", kernel="^gone$")])
    assert rep["unmatched"] == ["renamed (kernel regex '^gone$')"] and not rep["ungated"]
    assert {v["gate"] for v in rep["violations"]} == {"max_instr_per_elem", "forbid_local_in_loops"}
    md = "\n".join(sass.gates_markdown(rep, "g.json"))
    assert "**2.25** (<= 2) **FAIL**" in md and "0.5 (0.5 .. 0.5)" in md and "**matches no kernel**" in md


def test_op_patterns():
    assert sass.op_matches("LDG.E.128.CONSTANT", "LDG.E.128")
    assert sass.op_matches("STG.E.128.STRONG.SM", "STG.E.128")
    assert not sass.op_matches("LDG.E.64", "LDG.E.128")
    assert sass.op_matches("LDG.E", "LDG.E.32") and not sass.op_matches("LDG.E.U16", "LDG.E.32")
    assert sass.op_matches("LDG.E.128", "LDG.E") and sass.op_matches("LDG.E.U16", "LDG")
    assert not sass.op_matches("LDGSTS.E", "LDG") and sass.op_matches("STS.128", "STS.128")
    assert sass.op_matches("MUFU.EX2", "MUFU.EX2") and not sass.op_matches("MUFU.RCP", "MUFU.EX2")
    ops = ("LDG.E.128", "LDG.E.64", "LDG.E", "LDG.E.U8", "STG.E.S16")
    assert [sass.access_bytes(o) for o in ops] == [16, 8, 4, 1, 2]


@pytest.mark.parametrize("regs,smem,block,blocks,occ,limiter", [
    (32, 0, 256, 8, 1.0, "warps"),  # 64 warps: the warp limit
    (80, 1420, 256, 3, 0.375, "registers"),  # 2560 registers a warp: 6 warps per sub-partition
    (168, 0, 256, 1, 0.125, "registers"),
    (64, 0, 1024, 1, 0.5, "registers"),
    (40, 49152 + 400, 256, 4, 0.5, "shared"),  # 228 KiB / (48 KiB + 400 B + 1 KiB reserved)
    (16, 0, 32, 32, 0.5, "blocks"),  # 32 blocks of one warp
    (255, 0, 512, 0, 0.0, "registers"),  # too many registers for the block: no launch
    (200, 0, 320, 0, 0.0, "registers"),  # 10 warps are allocated as 12 by the launch check: no launch
])
def test_occupancy_model(regs, smem, block, blocks, occ, limiter):
    o = sass.occupancy("sm_90", regs, smem, block)
    assert (o["blocks_per_sm"], o["occupancy"], o["limiter"]) == (blocks, occ, limiter), o


def test_max_block_threads():
    assert [sass.max_block_threads(r) for r in (32, 64, 128, 200, 255)] == [1024, 1024, 512, 256, 256]


def test_gate_file_schema(tmp_path):
    gates = sass.load_gates(crr.DEFAULT_GATES)
    assert gates and all(g["name"] for g in gates)
    with open(crr.DEFAULT_GATES) as f:
        assert json.load(f)["_about"]
    p = tmp_path / "g.json"
    for entry, error in [({"kernel": "k", "max_instr_per_elm": 4}, "unknown key.*max_instr_per_elm"),
                         ({"kernel": "k", "max_instr_per_elem": 4}, "elems_per_iter"),
                         ({"kernel": "k", "note": "x"}, "sets no limit"),
                         ({"kernel": "k(", "max_spills": 0}, "bad kernel regex"),
                         ({"kernel": "k", "max_spills": 0, "loop": {"src": "x"}}, "\"loop\" takes"),
                         ({"max_spills": 0}, "needs a \"kernel\"")]:
        p.write_text(json.dumps({"gates": [entry]}))
        with pytest.raises(sass.SassError, match=error):
            sass.load_gates(str(p))


# ------------------------------------------------------------------------------------------ fixtures

def _run_tool(tmp_path, gates: list[dict[str, Any]], *files: str) -> tuple[subprocess.CompletedProcess, dict]:
    g, js = tmp_path / "gates.json", tmp_path / "r.json"
    g.write_text(json.dumps({"gates": gates}))
    p = subprocess.run([sys.executable, TOOL, "--files", *files, "--bare", "--arch", "9.0", "--gates", str(g),
                        "--out", str(tmp_path / "r.md"), "--json", str(js)],
                       capture_output=True, text=True, timeout=600)
    return p, json.loads(js.read_text()) if js.exists() else {}


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    """The fixtures compiled for sm_90 (cached under build/cuda_resources) and checked with FIXTURE_GATE."""
    if not HAVE_TOOLS:
        pytest.skip("needs nvcc and nvdisasm (set CUDA_HOME to a CUDA toolkit; triton bundles nvdisasm)")
    tmp = tmp_path_factory.mktemp("sass_fixtures")
    p, res = _run_tool(tmp, [FIXTURE_GATE], *FIXTURE_FILES)
    assert p.returncode != 2, p.stderr
    return p, res, (tmp / "r.md").read_text()


@needs_cuda_tools
def test_fixture_run_fails_with_one_line_per_broken_gate(fixture_run):
    p, res, md = fixture_run
    assert p.returncode == 1, p.stderr
    failed = [ln for ln in p.stderr.splitlines() if ln.startswith("SASS GATE FAILED")]
    assert len(failed) == 8, p.stderr  # scalar: LDG.E.128 and STG.E.128 missing; spill: two gates
    assert any("softmax_bad_expf: max_instr_per_elem: measured" in ln and "limit 10" in ln for ln in failed)
    assert any("softmax_bad_occupancy: min_occupancy: measured 0.125, limit 0.5" in ln for ln in failed)
    assert not any("softmax_good" in ln for ln in failed)
    assert "## SASS gates" in md and "**FAIL**" in md and "`softmax_good`" in md and "## SASS: loops" in md
    assert not any(k.startswith("_") for k in res["sass"]["kernels"][0])


@needs_cuda_tools
@pytest.mark.parametrize("kernel", sorted(EXPECTED_FAILURES))
def test_fixture_breaks_exactly_its_gate(fixture_run, kernel):
    results = [r for r in fixture_run[1]["sass"]["gates"]["results"] if r["kernel"] == kernel]
    assert {r["gate"] for r in results} >= {"max_instr_per_elem", "max_ex2_per_elem", "require", "max_spills",
                                            "forbid_local_in_loops", "min_occupancy"}
    assert {r["gate"] for r in results if not r["ok"]} == EXPECTED_FAILURES[kernel], results


@needs_cuda_tools
def test_fixture_measurements(fixture_run):
    kernels = {k["demangled"]: k for k in fixture_run[1]["sass"]["kernels"]}
    assert set(kernels) == set(EXPECTED_FAILURES)
    good = kernels["softmax_good"]
    assert (good["launch_bound"], good["spills"], good["stack"], good["irreducible_edges"]) == (256, 0, 0, 0)
    hot = good["loops"][good["hottest_loop"]]
    assert (hot["ex2"], hot["ldg_bits"], hot["stg_bits"], hot["ldl"] + hot["stl"]) == (4, {"128": 1}, {"128": 1}, 0)
    assert hot["src"].startswith("softmax_good.cu:") and hot["instructions"] / 4 < FIXTURE_GATE["max_instr_per_elem"]
    assert kernels["softmax_bad_occupancy"]["registers"] > 128
    spill = kernels["softmax_bad_spill"]
    assert spill["registers"] <= 64 and spill["spills"] > 0 and spill["occupancy"]["occupancy"] == 0.5


@needs_cuda_tools
def test_entry_matching_no_kernel_is_an_error(fixture_run, tmp_path):
    """A renamed kernel must not pass silently: exit 4 (the compile is cached by the module fixture)."""
    p, _ = _run_tool(tmp_path, [dict(FIXTURE_GATE, kernel="^softmax_good$"),
                                dict(FIXTURE_GATE, name="renamed", kernel="^softmax_renamed$")], FIXTURE_FILES[0])
    assert p.returncode == 4, p.stderr
    assert "entry renamed (kernel regex '^softmax_renamed$') matches no kernel" in p.stderr


# -------------------------------------------------------------------------------------- real sources

@pytest.mark.slow
@needs_cuda_tools
def test_csrc_kernels_pass_the_sass_gates(tmp_path):
    """bench/sass_gates.json on csrc/cuda/*.cu. Shares the compile gate's cache (build/cuda_resources): a
    few seconds when test_cuda_compile_gate.py has compiled the tree, about a minute on 2 cores when not."""
    js = tmp_path / "r.json"
    p = subprocess.run([sys.executable, TOOL, "--out", str(tmp_path / "r.md"), "--json", str(js)],
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode != 2, f"a .cu failed to compile:\n{p.stderr[-6000:]}"
    assert p.returncode == 0, p.stderr[-6000:]
    res = json.loads(js.read_text())
    cu_files = {os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))}
    assert {k["file"] for k in res["sass"]["kernels"]} == cu_files  # every .cu yields kernels
    ungated = res["sass"]["gates"]["ungated"]
    assert not [k for k in ungated if "margin_ce_stream_kernel" in k], "every stream instantiation is gated"
