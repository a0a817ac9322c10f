"""SASS analysis and the kernel gates of the compile gate (tools/cuda_resource_report.py).

From ``nvdisasm -c -g`` text of a cubin: each kernel's control-flow graph, its natural loops (a back edge
is a branch to a block that dominates it, so an out-of-line block that jumps back into a loop is not a
loop) and per loop the counts the gates read (instructions, MUFU.EX2, global access widths, local
memory). A loop's counts are of its *own* instructions: its body, every block once, less the loops nested
in it. Also the theoretical occupancy model, and the gate file (bench/sass_gates.json) with its checks.
No tool is run here: the caller passes the disassembly and ptxas' resource rows.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable


class SassError(RuntimeError):
    """A failure the caller reports in one line (an unreadable gate file, SASS the analysis cannot model)."""


# ----------------------------------------------------------------------------------------------- SASS

@dataclass
class Instr:
    """One SASS instruction. ``opcode`` keeps its modifiers (``LDG.E.128.CONSTANT``); ``guard`` is the
    predicate after ``@`` (``""``, ``"P0"``, ``"!P1"``); ``target`` the resolved branch / call address."""

    addr: int
    opcode: str
    guard: str = ""
    operands: str = ""
    target: int | None = None
    src: str = ""  # "file:line" of the innermost source location (-lineinfo), "" without one

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]


_RE_FUNC = re.compile(r"^//-+\s+\.text\.(\S+)\s+-+")
_RE_SECTION = re.compile(r"^//-+\s+\S")
_RE_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(?:@(!?U?P[T0-9]+)\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)"
                       r"\s*([^;]*);")
_RE_LABEL = re.compile(r"^\s*([.$\w]+):\s*$")
_RE_FILE_LINE = re.compile(r'//##\s+File\s+"([^"]+)",\s+line\s+(\d+)')
_RE_LABEL_REF = re.compile(r"`\(([^)]+)\)")
_RE_PRED_OPERAND = re.compile(r"^!?U?P[0-9T]")
_BRANCHES = {"BRA", "JMP"}  # direct; BRX / JMX (indirect: jump tables) leave a function's loops unknown
_ENDS = {"EXIT", "RET", "KILL", "BPT"}


def parse_nvdisasm(text: str, indirect: dict[str, str] | None = None) -> dict[str, list[Instr]]:
    """Function name -> its instructions, from ``nvdisasm -c -g``; branch and local call targets resolved."""
    funcs: dict[str, list[Instr]] = {}
    labels: dict[str, dict[str, int]] = {}
    cur: str | None = None
    src = ""
    pending: list[str] = []
    for line in text.splitlines():
        m = _RE_FUNC.match(line)
        if m:
            cur, src, pending = m.group(1), "", []
            funcs[cur], labels[cur] = [], {}
            continue
        if _RE_SECTION.match(line):
            cur = None
        if cur is None:
            continue
        if m := _RE_FILE_LINE.search(line):
            src = f"{m.group(1).rsplit('/', 1)[-1]}:{m.group(2)}"
        elif m := _RE_INSTR.match(line):
            ins = Instr(int(m.group(1), 16), m.group(3), m.group(2) or "", m.group(4).strip(), None, src)
            labels[cur].update((lb, ins.addr) for lb in pending)
            pending = []
            funcs[cur].append(ins)
        elif m := _RE_LABEL.match(line):
            pending.append(m.group(1))
    for name, instrs in funcs.items():
        for ins in instrs:
            if ins.base in ("BRX", "JMX"):
                msg = (f"{name}: indirect branch {ins.opcode} at 0x{ins.addr:04x}: its control flow is unknown to "
                       "the loop analysis")
                if indirect is None:
                    raise SassError(msg)
                indirect.setdefault(name, msg)  # (the caller analyses no loops of this function)
                continue
            if ins.base in _BRANCHES or ins.opcode.startswith("CALL.REL"):
                m = _RE_LABEL_REF.search(ins.operands)
                if not m or m.group(1) not in labels[name]:
                    raise SassError(f"{name}: {ins.opcode} {ins.operands} at 0x{ins.addr:04x}: unresolved target")
                ins.target = labels[name][m.group(1)]
    return funcs


# ----------------------------------------------------------------------------------------- op patterns

_WIDTH_TOKENS = {"128": 16, "64": 8, "256": 32, "U8": 1, "S8": 1, "U16": 2, "S16": 2}
_MEMORY = {"LDG", "STG", "LDL", "STL", "LDS", "STS", "LD", "ST"}


def access_bytes(opcode: str) -> int:
    """Bytes one thread moves with a memory instruction (``LDG.E.128`` 16, ``LDG.E`` 4, ``LDG.E.U16`` 2)."""
    return next((_WIDTH_TOKENS[t] for t in opcode.split(".")[1:] if t in _WIDTH_TOKENS), 4)


def op_matches(opcode: str, pattern: str) -> bool:
    """Whether ``opcode`` is an instance of ``pattern``: the same base and every modifier of the pattern
    (``LDG.E.128`` matches ``LDG.E.128.CONSTANT``; ``LDG`` any global load; ``LDG.E.32`` a 4-byte one: a
    memory access without a width modifier gets the token ``32``)."""
    pbase, *pmods = pattern.split(".")
    base, *mods = opcode.split(".")
    toks = set(mods)
    if base in _MEMORY and not toks & _WIDTH_TOKENS.keys():
        toks.add("32")
    return base == pbase and set(pmods) <= toks


def count_ops(instrs: Iterable[Instr], pattern: str) -> int:
    return sum(op_matches(i.opcode, pattern) for i in instrs)


def _widths(instrs: Iterable[Instr], base: str) -> dict[str, int]:
    """Access width in bits -> count, widest first."""
    c = Counter(str(access_bytes(i.opcode) * 8) for i in instrs if i.base == base)
    return dict(sorted(c.items(), key=lambda kv: -int(kv[0])))


def op_summary(instrs: list[Instr]) -> dict[str, Any]:
    """The counts the report and the gates read, over a set of instructions."""
    mufu = Counter(i.opcode.split(".")[1] for i in instrs if i.base == "MUFU" and "." in i.opcode)
    bases = Counter(i.base for i in instrs)
    return {
        "instructions": len(instrs),
        "ex2": mufu.pop("EX2", 0),
        "mufu_other": dict(sorted(mufu.items())),
        "ldg_bits": _widths(instrs, "LDG"),
        "stg_bits": _widths(instrs, "STG"),
        "global_bytes": sum(access_bytes(i.opcode) for i in instrs if i.base in ("LDG", "STG")),
        "ldg_bytes": sum(access_bytes(i.opcode) for i in instrs if i.base == "LDG"),
        **{k.lower(): bases[k] for k in ("LDL", "STL", "LDS", "STS", "CALL")},
    }


# ------------------------------------------------------------------------------------------ CFG / loops

@dataclass
class Loop:
    """A natural loop (all back edges to one header merged) and the summary of its own instructions."""

    header: int  # address of the header's first instruction
    blocks: frozenset[int]  # block indices, nested loops' included
    body_size: int  # instructions of the body, nested loops' included
    src: str  # source line of the (last) back-edge branch: the loop statement
    depth: int = 1
    inner_loops: int = 0  # loops nested in this one, any depth
    own: list[Instr] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return self.src or f"0x{self.header:04x}"

    def to_json(self) -> dict[str, Any]:
        return {"header": f"0x{self.header:04x}", "src": self.src, "depth": self.depth,
                "inner_loops": self.inner_loops, "body_instructions": self.body_size, **self.summary}


@dataclass
class Cfg:
    """Basic blocks as [first, end) instruction index ranges, their successors, and the roots: the entry
    and every local CALL target (subroutines after the kernel's EXIT)."""

    bounds: list[tuple[int, int]]
    succs: list[list[int]]
    roots: list[int]


def _conditional(i: Instr) -> bool:
    """Whether a branch or exit may fall through: a guard other than PT, a predicate operand
    (``BRA P2, ...``, ``EXIT P1``) or a divergence test (``BRA.DIV``)."""
    return (bool(i.guard) and i.guard != "PT") or bool(_RE_PRED_OPERAND.match(i.operands)) or ".DIV" in i.opcode


def build_cfg(instrs: list[Instr]) -> Cfg:
    """Blocks start at the entry, at every branch or call target and after every branch, call and exit."""
    index = {ins.addr: k for k, ins in enumerate(instrs)}
    leaders = {0}
    for k, ins in enumerate(instrs):
        if ins.target is not None:
            leaders.add(index[ins.target])
        if ins.base in _BRANCHES or ins.base in _ENDS or ins.base == "CALL":
            leaders.add(k + 1)
    starts = sorted(x for x in leaders if x < len(instrs))
    bounds = list(zip(starts, starts[1:] + [len(instrs)]))
    block_of = {s: n for n, (s, _) in enumerate(bounds)}
    succs, roots = [], {0} if bounds else set()
    for n, (s, e) in enumerate(bounds):
        last = instrs[e - 1]
        nxt = [n + 1] if n + 1 < len(bounds) else []
        if last.base == "CALL" and last.target is not None:
            roots.add(block_of[index[last.target]])
        if last.base in _BRANCHES:
            succs.append([block_of[index[last.target]]] + (nxt if _conditional(last) else []))
        elif last.base in _ENDS:
            succs.append(nxt if _conditional(last) else [])
        else:
            succs.append(nxt)
    return Cfg(bounds, succs, sorted(roots))


def _reverse_postorder(succs: list[list[int]], roots: list[int]) -> list[int]:
    order: list[int] = []
    seen: set[int] = set()
    for r in roots:
        if r in seen:
            continue
        seen.add(r)
        stack = [(r, iter(succs[r]))]
        while stack:
            node, it = stack[-1]
            nxt = next((s for s in it if s not in seen), None)
            if nxt is None:
                order.append(node)
                stack.pop()
            else:
                seen.add(nxt)
                stack.append((nxt, iter(succs[nxt])))
    return order[::-1]


def dominators(cfg: Cfg) -> tuple[dict[int, int], list[int]]:
    """Immediate dominators of the reachable blocks (Cooper, Harvey, Kennedy) below a virtual root -1 above
    the roots, and the reverse postorder."""
    rpo = _reverse_postorder(cfg.succs, cfg.roots)
    pos = {b: k for k, b in enumerate(rpo)}
    pos[-1] = -1
    preds: dict[int, list[int]] = {b: [] for b in rpo}
    for b in rpo:
        for s in cfg.succs[b]:
            preds[s].append(b)
    for r in cfg.roots:
        preds[r].append(-1)
    idom = {-1: -1}

    def intersect(a: int, b: int) -> int:
        while a != b:
            while pos[a] > pos[b]:
                a = idom[a]
            while pos[b] > pos[a]:
                b = idom[b]
        return a

    changed = True
    while changed:
        changed = False
        for b in rpo:
            ps = [p for p in preds[b] if p in idom]
            new = ps[0]
            for p in ps[1:]:
                new = intersect(p, new)
            if idom.get(b) != new:
                idom[b], changed = new, True
    return idom, rpo


def _dominates(idom: dict[int, int], a: int, b: int) -> bool:
    while b != a:
        if b == -1:
            return False
        b = idom[b]
    return True


def find_loops(instrs: list[Instr]) -> tuple[list[Loop], int]:
    """The natural loops of one function in address order, with their own instructions' summaries, and the
    number of retreating edges that are no back edge (an irreducible loop, which the analysis cannot see)."""
    cfg = build_cfg(instrs)
    idom, rpo = dominators(cfg)
    pos = {b: k for k, b in enumerate(rpo)}
    tails: dict[int, list[int]] = {}
    irreducible = 0
    for t in rpo:
        for h in cfg.succs[t]:
            if _dominates(idom, h, t):
                tails.setdefault(h, []).append(t)
            elif pos[h] <= pos[t]:
                irreducible += 1
    preds: dict[int, list[int]] = {b: [] for b in rpo}
    for b in rpo:
        for s in cfg.succs[b]:
            preds[s].append(b)
    loops = []
    for h, ts in tails.items():
        body, work = {h, *ts}, [t for t in ts if t != h]
        while work:
            for p in preds[work.pop()]:
                if p not in body:
                    body.add(p)
                    work.append(p)
        last_tail = max(ts, key=lambda t: cfg.bounds[t][1])
        loops.append(Loop(header=instrs[cfg.bounds[h][0]].addr, blocks=frozenset(body),
                          body_size=sum(e - s for s, e in (cfg.bounds[b] for b in body)),
                          src=instrs[cfg.bounds[last_tail][1] - 1].src))
    for lp in loops:
        nested = [o for o in loops if o.blocks < lp.blocks]
        lp.inner_loops = len(nested)
        lp.depth = 1 + sum(lp.blocks < o.blocks for o in loops)
        own = lp.blocks.difference(*(o.blocks for o in nested))
        lp.own = [ins for b in sorted(own) for ins in instrs[slice(*cfg.bounds[b])]]
        lp.summary = op_summary(lp.own)
    return sorted(loops, key=lambda lp: lp.header), irreducible


def reachable_count(instrs: list[Instr]) -> int:
    """Instructions reachable from the entry or a CALL target (not the trailing ``BRA self`` and NOPs)."""
    cfg = build_cfg(instrs)
    return sum(e - s for s, e in (cfg.bounds[b] for b in _reverse_postorder(cfg.succs, cfg.roots)))


def hottest(loops: list[Loop]) -> Loop | None:
    """The loop whose own instructions move the most global bytes per iteration; ties go to the fewest
    (widest) accesses, then the most instructions. (Not simply the innermost loop: a cold inner loop, e.g.
    the Payne-Hanek reduction of sinf for huge arguments, would hide the hot loop around it.)"""
    def key(lp: Loop) -> tuple[int, int, int, int]:
        s = lp.summary
        accesses = sum(s["ldg_bits"].values()) + sum(s["stg_bits"].values())
        return s["global_bytes"], -accesses, s["instructions"], -lp.header

    return max(loops, key=key, default=None)


# ------------------------------------------------------------------------------------------ occupancy

# Per-SM limits (CUDA occupancy calculator, cuda_occupancy.h): warps, blocks, registers (allocated per warp
# in 256-register units, split over 4 sub-partitions), shared memory (128-byte units, 1 KiB reserved a block).
ARCH_LIMITS: dict[str, dict[str, int]] = {
    "sm_90": {"warps": 64, "blocks": 32, "regs": 65536, "reg_unit": 256, "max_regs": 255, "subpartitions": 4,
              "smem": 228 * 1024, "smem_block": 227 * 1024, "smem_reserved": 1024, "smem_unit": 128},
    "sm_80": {"warps": 64, "blocks": 32, "regs": 65536, "reg_unit": 256, "max_regs": 255, "subpartitions": 4,
              "smem": 164 * 1024, "smem_block": 163 * 1024, "smem_reserved": 1024, "smem_unit": 128},
}


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(arch: str, registers: int, smem: int, block: int) -> dict[str, Any]:
    """Theoretical occupancy (active warps / max warps per SM) of ``block``-thread blocks using ``smem``
    bytes of shared memory (static + dynamic): the least of the warp, block, register and shared-memory
    limits, and which one binds (ties: in that order). 0 blocks: the launch fails."""
    if arch not in ARCH_LIMITS:
        raise SassError(f"no occupancy limits for {arch} (known: {', '.join(ARCH_LIMITS)})")
    L = ARCH_LIMITS[arch]
    wpb = -(-block // 32)
    regs_warp = _round_up(max(registers, 1) * 32, L["reg_unit"])
    # a block must fit the register file as if allocated on all sub-partitions at once (the launch check)
    fits = registers <= L["max_regs"] and regs_warp * _round_up(wpb, L["subpartitions"]) <= L["regs"]
    limits = {
        "warps": L["warps"] // wpb,
        "blocks": L["blocks"],
        "registers": L["regs"] // L["subpartitions"] // regs_warp * L["subpartitions"] // wpb if fits else 0,
        "shared": 0 if smem > L["smem_block"] else
        L["smem"] // _round_up(smem + L["smem_reserved"], L["smem_unit"]),
    }
    blocks = min(limits.values())
    return {"block": block, "smem": smem, "blocks_per_sm": blocks, "occupancy": blocks * wpb / L["warps"],
            "limiter": min(limits, key=limits.__getitem__)}


def max_block_threads(registers: int, arch: str = "sm_90") -> int:
    """The largest block (a multiple of 32, at most 1024) that the register count lets launch (the register
    file is the same from sm_80 to sm_90)."""
    return max((t for t in range(32, 1025, 32) if occupancy(arch, registers, 0, t)["blocks_per_sm"]), default=0)


# ------------------------------------------------------------------------------------------- kernels

def analyse(sass: str, functions: dict[str, dict[str, Any]], arch: str, file: str,
            demangled: dict[str, str], default_block: int = 256) -> list[dict[str, Any]]:
    """One record per kernel of a cubin's disassembly. ``functions``: ptxas' rows of this arch's entry
    functions by name (registers, stack, spills, static smem, launch_bound). JSON-able but for ``_loops``
    (the Loop objects, which the gates read)."""
    out = []
    indirect: dict[str, str] = {}  # functions with an indirect branch (a jump table): no loops found in them
    for name, instrs in sorted(parse_nvdisasm(sass, indirect).items()):
        fn = functions.get(name)
        if fn is None:
            continue  # not an entry function
        loops, irreducible = find_loops(instrs) if name not in indirect else ([], 0)
        hot = hottest(loops)
        block = fn.get("launch_bound") or default_block
        out.append({
            "file": file, "arch": arch, "function": name, "demangled": demangled.get(name, name),
            "registers": fn["registers"], "stack": fn["stack"], "spills": fn["spill_stores"] + fn["spill_loads"],
            "smem": fn["smem"], "launch_bound": fn.get("launch_bound"), "block": block,
            "occupancy": occupancy(arch, fn["registers"], fn["smem"], block),
            "instructions": reachable_count(instrs), "irreducible_edges": irreducible,
            "loops": [lp.to_json() for lp in loops], "hottest_loop": loops.index(hot) if hot else None,
            "local_in_loops": sum(lp.summary["ldl"] + lp.summary["stl"] for lp in loops),  # own sets: disjoint
            "unanalysable": indirect.get(name, ""),
            "_loops": loops,
        })
    return out


# ------------------------------------------------------------------------------------------- gates

LIMIT_KEYS = {"max_instr_per_elem", "max_ex2_per_elem", "min_ex2_per_elem", "require", "max_spills",
              "forbid_local_in_loops", "min_occupancy"}
LOOP_LIMITS = {"max_instr_per_elem", "max_ex2_per_elem", "min_ex2_per_elem", "require"}
GATE_KEYS = LIMIT_KEYS | {"kernel", "name", "note", "loop", "elems_per_iter", "block", "dyn_smem"}


def _check_gate(g: Any, where: str) -> None:
    if not isinstance(g, dict) or not isinstance(g.get("kernel"), str):
        raise SassError(f"{where}: needs a \"kernel\" regex")
    if set(g) - GATE_KEYS:
        raise SassError(f"{where}: unknown key(s) {sorted(set(g) - GATE_KEYS)} (known: {sorted(GATE_KEYS)})")
    if not set(g) & LIMIT_KEYS:
        raise SassError(f"{where}: sets no limit (one of {sorted(LIMIT_KEYS)})")
    try:
        re.compile(g["kernel"])
    except re.error as e:
        raise SassError(f"{where}: bad kernel regex: {e}") from e
    sel = g.get("loop", {})
    if not isinstance(sel, dict) or set(sel) - {"has", "lacks"}:
        raise SassError(f"{where}: \"loop\" takes {{\"has\": [op, ...], \"lacks\": [op, ...]}}")
    per_elem = set(g) & (LOOP_LIMITS - {"require"})
    spec = g.get("elems_per_iter")
    if per_elem and spec is None:
        raise SassError(f"{where}: {sorted(per_elem)} need \"elems_per_iter\"")
    ok = spec is None or (isinstance(spec, (int, float)) and spec > 0) or (isinstance(spec, dict) and (
        set(spec) == {"op", "per_op"} or set(spec) == {"load_bytes"}))
    if not ok:
        raise SassError(f"{where}: bad elems_per_iter {spec!r} (a number > 0, {{\"op\": PATTERN, \"per_op\": n}} "
                        "or {\"load_bytes\": b})")


def load_gates(path: str) -> list[dict[str, Any]]:
    """The "gates" list of a gate file, validated: an unknown key is an error (a misspelt limit must not
    silently gate nothing); each entry gets a "name" (default gates[i])."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SassError(f"cannot read gate file {path}: {e}") from e
    gates = doc.get("gates") if isinstance(doc, dict) else None
    if not isinstance(gates, list):
        raise SassError(f"{path}: expected an object with a \"gates\" list")
    for n, g in enumerate(gates):
        _check_gate(g, f"{path}: gates[{n}]")
        g.setdefault("name", f"gates[{n}]")
    return gates


def select_loop(rec: dict[str, Any], gate: dict[str, Any]) -> Loop | None:
    """The hottest of the kernel's loops whose own instructions hold every "has" op and no "lacks" op
    (default: a loop with a global load)."""
    sel = gate.get("loop", {"has": ["LDG"]})
    loops = [lp for lp in rec["_loops"] if all(count_ops(lp.own, p) for p in sel.get("has", []))
             and not any(count_ops(lp.own, p) for p in sel.get("lacks", []))]
    return hottest(loops)


def loop_elements(lp: Loop, spec: Any) -> float:
    """Elements one thread processes per iteration of ``lp``: a number; {"op": PATTERN, "per_op": n} (n per
    matching instruction: follows the compiler's unrolling); {"load_bytes": b} (global bytes loaded / b)."""
    if isinstance(spec, (int, float)):
        return float(spec)
    if "op" in spec:
        return float(count_ops(lp.own, spec["op"]) * spec["per_op"])
    return lp.summary["ldg_bytes"] / spec["load_bytes"]


def evaluate_gate(rec: dict[str, Any], gate: dict[str, Any]) -> list[dict[str, Any]]:
    """Every check of one gate entry on one kernel, passing or not: {"gate", "measured", "limit", "ok",
    "loop", "detail"}."""
    out: list[dict[str, Any]] = []

    def add(check: str, measured: Any, limit: Any, ok: bool, loop: Loop | None = None, detail: str = "") -> None:
        out.append({"entry": gate["name"], "kernel": rec["demangled"], "file": rec["file"], "gate": check,
                    "measured": measured, "limit": limit, "ok": bool(ok), "loop": loop.where if loop else "",
                    "detail": detail})

    reads_loops = bool(set(gate) & LOOP_LIMITS) or gate.get("forbid_local_in_loops")
    if reads_loops and rec.get("unanalysable"):
        # a gate on the loops of a kernel whose loops are unknown fails, naming why; its other checks still run
        add("cfg", "indirect branch", "none", False, detail=rec["unanalysable"])
        gate = {k: v for k, v in gate.items() if k not in LOOP_LIMITS and k != "forbid_local_in_loops"}
    if reads_loops and rec["irreducible_edges"]:
        add("cfg", f"{rec['irreducible_edges']} irreducible edge(s)", "none", False,
            detail="a loop without a dominating header: its instructions are in no loop's counts")
    if set(gate) & LOOP_LIMITS:
        lp = select_loop(rec, gate)
        elems = loop_elements(lp, gate.get("elems_per_iter", 1)) if lp else 0.0
        if lp is None:
            add("loop", "none", f"a loop with {gate.get('loop', {'has': ['LDG']})}", False,
                detail=f"{len(rec['loops'])} loop(s), none selected")
        elif elems <= 0:
            add("elems_per_iter", 0, "> 0", False, lp, f"{gate['elems_per_iter']} counts no element in this loop")
        else:
            s = lp.summary
            per = {"max_instr_per_elem": s["instructions"] / elems, "max_ex2_per_elem": s["ex2"] / elems,
                   "min_ex2_per_elem": s["ex2"] / elems}
            detail = f"{s['instructions']} instr, {s['ex2']} EX2, {elems:g} elem/iter"
            for k in sorted(set(gate) & per.keys()):
                ok = per[k] >= gate[k] if k.startswith("min") else per[k] <= gate[k]
                add(k, round(per[k], 3), gate[k], ok, lp, detail)
            for pat in gate.get("require", []):
                n = count_ops(lp.own, pat)
                add("require", f"{n}x {pat}", f">= 1x {pat}", n > 0, lp,
                    f"loads {fmt_bits(s['ldg_bits'])}, stores {fmt_bits(s['stg_bits'])}")
    if "max_spills" in gate:
        add("max_spills", rec["spills"], gate["max_spills"], rec["spills"] <= gate["max_spills"])
    if gate.get("forbid_local_in_loops"):
        bad = [lp for lp in rec["_loops"] if lp.summary["ldl"] + lp.summary["stl"]]
        add("forbid_local_in_loops", rec["local_in_loops"], 0, not bad,
            detail=", ".join(f"{lp.where}: {lp.summary['ldl']} LDL {lp.summary['stl']} STL" for lp in bad))
    if "min_occupancy" in gate:
        block = gate.get("block") or rec["block"]
        occ = occupancy(rec["arch"], rec["registers"], rec["smem"] + gate.get("dyn_smem", 0), block)
        add("min_occupancy", round(occ["occupancy"], 4), gate["min_occupancy"],
            occ["occupancy"] >= gate["min_occupancy"],
            detail=f"{rec['registers']} regs, {occ['smem']} B smem, block {block}: {occ['blocks_per_sm']} "
                   f"blocks/SM, limited by {occ['limiter']}")
    return out


def check_gates(kernels: list[dict[str, Any]], gates: list[dict[str, Any]]) -> dict[str, Any]:
    """Every gate entry on every kernel its regex matches (re.search on the demangled name): {"results"
    (every check), "violations" (the failed ones), "unmatched" (entries that match no kernel), "ungated"
    (kernels that no entry matches)}."""
    results: list[dict[str, Any]] = []
    unmatched: list[str] = []
    gated: set[str] = set()
    for g in gates:
        hits = [k for k in kernels if re.search(g["kernel"], k["demangled"])]
        if not hits:
            unmatched.append(f"{g['name']} (kernel regex {g['kernel']!r})")
        for k in hits:
            gated.add(k["function"])
            results += evaluate_gate(k, g)
    return {"results": results, "violations": [r for r in results if not r["ok"]], "unmatched": unmatched,
            "ungated": [k["demangled"] for k in kernels if k["function"] not in gated]}


# --------------------------------------------------------------------------------------------- report

def fmt_bits(d: dict[str, int]) -> str:
    return ", ".join(f"{b}b x{n}" for b, n in d.items()) or "-"


def short_name(demangled: str) -> str:
    """``void ns::k<float>(Args<float>)`` -> ``ns::k<float>``."""
    s = re.sub(r"^void\s+", "", demangled)
    depth = 0
    for n, ch in enumerate(s):
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            return s[:n]
    return s


def _md(s: Any) -> str:
    return str(s).replace("|", "\\|")


_GATE_COLUMNS = [("instr/elem", ("max_instr_per_elem",)), ("EX2/elem", ("min_ex2_per_elem", "max_ex2_per_elem")),
                 ("required ops", ("require",)), ("spills (B)", ("max_spills",)),
                 ("LDL/STL in loops", ("forbid_local_in_loops",)), ("occupancy", ("min_occupancy",))]


def _gate_cell(checks: list[dict[str, Any]]) -> str:
    if not checks:
        return ""
    if checks[0]["gate"] == "require":
        return ", ".join(c["measured"] if c["ok"] else f"**{c['measured']}**" for c in checks)
    pct = checks[0]["gate"] == "min_occupancy"
    fmt = (lambda x: f"{x:.1%}") if pct else str
    bound = {c["gate"][:3]: fmt(c["limit"]) for c in checks}  # "min" / "max"
    limits = f"{bound['min']} .. {bound['max']}" if len(bound) == 2 else \
        f"{'>=' if 'min' in bound else '<='} {next(iter(bound.values()))}"
    value = fmt(checks[0]["measured"])
    return f"{value} ({limits})" if all(c["ok"] for c in checks) else f"**{value}** ({limits}) **FAIL**"


def gates_markdown(report: dict[str, Any], gates_path: str) -> list[str]:
    """One row per (gate entry, kernel): the measured values, each with its limit; failures in bold."""
    v = report["violations"]
    lines = [f"## SASS gates (`{gates_path}`)", "",
             f"**Violations: {len(v)}** of {len(report['results'])} checks; entries matching no kernel: "
             f"{len(report['unmatched'])}; kernels no entry gates: {len(report['ungated'])}.", "",
             "| gate | kernel | loop | " + " | ".join(c for c, _ in _GATE_COLUMNS) + " | other |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---|"]
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in report["results"]:
        rows.setdefault((r["entry"], r["kernel"]), []).append(r)
    known = {k for _, ks in _GATE_COLUMNS for k in ks}
    for (entry, kernel), checks in rows.items():
        loop = next((c["loop"] for c in checks if c["loop"]), "")
        cells = [_gate_cell([c for c in checks if c["gate"] in ks]) for _, ks in _GATE_COLUMNS]
        other = "; ".join(f"**{c['gate']}: {c['measured']}** ({c['detail']})" for c in checks
                          if c["gate"] not in known)
        lines.append(f"| {_md(entry)} | `{_md(short_name(kernel))}` | {_md(loop)} | "
                     + " | ".join(_md(c) for c in cells) + f" | {_md(other)} |")
    lines += [f"| {_md(u)} | **matches no kernel** |" + " |" * 8 for u in report["unmatched"]]
    return lines + [""]


def kernels_markdown(kernels: list[dict[str, Any]], arch: str) -> list[str]:
    """The kernels (occupancy, hottest loop) and every loop of each, for one arch."""
    lines = [f"## SASS: kernels ({arch})", "",
             "Instructions: those reachable in the kernel. Occupancy: theoretical, for the `__launch_bounds__` "
             "block (else 256 threads) and static shared memory only. Hottest loop: the one whose own "
             "instructions move the most global bytes per iteration. `LDG` / `STG`: access width in bits x "
             "count.", "",
             "| kernel | regs | occupancy | instr | loops | hottest loop | its instr | EX2 | LDG | STG "
             "| LDL/STL in loops |",
             "|---|---:|---|---:|---:|---|---:|---:|---|---|---:|"]
    for k in kernels:
        o, hot = k["occupancy"], k["loops"][k["hottest_loop"]] if k["hottest_loop"] is not None else None
        hot_cols = (f"{_md(hot['src'] or hot['header'])} | {hot['instructions']} | {hot['ex2']} | "
                    f"{fmt_bits(hot['ldg_bits'])} | {fmt_bits(hot['stg_bits'])}" if hot else "- | - | - | - | -")
        lines.append(f"| `{_md(short_name(k['demangled']))}` | {k['registers']} | {o['occupancy']:.1%} "
                     f"({o['limiter']}, {o['block']} thr) | {k['instructions']} | {len(k['loops'])} | {hot_cols} | "
                     f"{k['local_in_loops']} |")
    lines += ["", f"## SASS: loops ({arch})", "",
              "The natural loops of each kernel's control-flow graph; `src`: the source line of the back-edge "
              "branch (the loop statement). A loop's counts are of its own instructions (every block of its "
              "body once, so a rarely taken branch counts, less the loops nested in it, which have rows of "
              "their own); `body`: the whole body's.", "",
              "| kernel | loop (src) @ header | depth | own instr | body | EX2 | other MUFU | LDG | STG "
              "| LDS/STS | LDL/STL | CALL |",
              "|---|---|---:|---:|---:|---:|---|---|---|---:|---:|---:|"]
    for k in kernels:
        for n, lp in enumerate(k["loops"]):
            hot = " **(hottest)**" if n == k["hottest_loop"] else ""
            mufu = ", ".join(f"{op} x{c}" for op, c in lp["mufu_other"].items()) or "-"
            lines.append(f"| `{_md(short_name(k['demangled']))}` | {_md(lp['src'] or '-')} @{lp['header']}{hot} | "
                         f"{lp['depth']} | {lp['instructions']} | {lp['body_instructions']} | {lp['ex2']} | {mufu} | "
                         f"{fmt_bits(lp['ldg_bits'])} | {fmt_bits(lp['stg_bits'])} | {lp['lds']}/{lp['sts']} | "
                         f"{lp['ldl']}/{lp['stl']} | {lp['call']} |")
    return lines + [""]
