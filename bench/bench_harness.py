"""Images/s of the harness's training step against a bare hand-written loop with the same model, loss,
optimizer and batches, timed interleaved in one process.

    python bench/bench_harness.py                         # both cases, prints the Markdown table
    python bench/bench_harness.py --readme README.md      # also rewrites README's harness-bench block

Cases: ``digits`` (the digits_lt recipe: its small CNN, fused cross-entropy, SGD, batches drawn by the
harness's own loader from digits-LT) and ``cifar`` (the cifar10_lt recipe's ResNet-32 on synthetic
3x32x32 inputs, batch 128). The harness side is exactly what the loop runs per batch: ``StepRunner`` (lr from
the schedule, non_blocking copies, autocast context, loss driver, backward, optimizer step, device-side loss
statistics) and ``Trainer.after_step`` (step counter, interval read, checkpoint check). The bare side is
``zero_grad; loss = criterion(model(x), y); backward; step``. Both start from the same weights with the same
constant learning rate, so after the same batches they must hold the same weights (checked: ``check_same``),
which is what makes the comparison one of overhead only.

Timing: rounds of ``--steps`` steps per side, the order of the two sides flipped every round, each block
closed by a device synchronisation on CUDA. Images/s and the harness ÷ bare ratio come from the fastest block
of each side (as the other interleaved benchmarks here: load from other processes only ever slows a block
down); the median and range of the per-round ratios are shown beside it. This is a script, not a
pytest-benchmark suite: ``python -m bench.report`` finds no benchmarks in it and moves on.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ltkernels._readme import replace_marked_block  # noqa: E402
from ltkernels.data import build_datasets  # noqa: E402
from ltkernels.models import build_model  # noqa: E402
from ltkernels.train import build_config  # noqa: E402
from ltkernels.train.engine import (LossStats, StageState, StepRunner, Trainer, apply_model_options,  # noqa: E402
                                    resolve_head)
from ltkernels.train.loss_factory import LossDriver  # noqa: E402

CASES = {
    # recipe, overrides, synthetic input shape (None: the recipe's own data), batch
    "digits": ("digits_lt", ["method=ce"], None),
    "cifar": ("cifar10_lt", ["method=ce", "data.batch_size=128"], (3, 32, 32)),
}
# same constant lr on both sides (the bare loop has no schedule), no augmentation randomness in the batches
COMMON = ["optim.schedule=constant", "optim.warmup_epochs=0", "train.progress=false", "train.tensorboard=false",
          "train.figures=false", "loss.impl=fused"]
START, END = "<!-- harness-bench:start -->", "<!-- harness-bench:end -->"


class Pair:
    """The harness step and the bare step of one case, sharing initial weights and batches."""

    def __init__(self, case: str, device: str, n_batches: int, out_dir: str, extra: List[str] = ()):
        recipe, ov, synthetic = CASES[case]
        cfg = build_config(recipe, COMMON + ov + [f"device={device}", f"output_dir={out_dir}"] + list(extra))
        self.cfg, self.device = cfg, torch.device(device if device != "auto" else
                                                  ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(0)
        bs = cfg["data"]["batch_size"]
        if synthetic is None:
            ds = build_datasets(cfg["data"], cfg["seed"])
            C, counts = ds["num_classes"], ds["cls_num_list"]
            loader = torch.utils.data.DataLoader(ds["train"], batch_size=bs, shuffle=True, drop_last=True)
            batches = []
            while len(batches) < n_batches:
                batches += [(x, torch.as_tensor(y)) for x, y in loader]
            self.batches = batches[:n_batches]
        else:
            C = 10
            counts = [int(5000 * 0.01 ** (i / (C - 1))) for i in range(C)]
            self.batches = [(torch.randn(bs, *synthetic), torch.randint(0, C, (bs,))) for _ in range(n_batches)]
        if self.device.type == "cuda":
            self.batches = [(x.pin_memory(), y.pin_memory()) for x, y in self.batches]
        self.C, self.counts, self.bs = C, counts, bs
        m = {**cfg["model"], "head": resolve_head(cfg)}
        base = build_model(m, C)
        self.h_model = apply_model_options(copy.deepcopy(base), cfg["model"], cfg["train"], self.device, 1,
                                           lambda *a: None)
        self.b_model = apply_model_options(copy.deepcopy(base), cfg["model"], cfg["train"], self.device, 1,
                                           lambda *a: None)
        o = cfg["optim"]

        def sgd(model):
            return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=o["lr"],
                                   momentum=o["momentum"], weight_decay=o["weight_decay"], nesterov=o["nesterov"])
        # the harness side, wired as Trainer.fit_stage wires it
        self.trainer = Trainer(cfg, log=lambda *a: None)
        self.trainer.global_step = 0
        self.trainer.tb = None
        driver = LossDriver(cfg["loss"], counts, cfg["optim"]["epochs"], device=self.device)
        driver.bind_head(self.h_model.head)
        h_opt = sgd(self.h_model)
        amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["train"]["amp"]]
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.state = StageState(si=0, cfg=cfg, model=self.h_model, opt=h_opt, scaler=scaler, sampler=None,
                                best={}, stats=LossStats(), log_every=int(cfg["train"]["log_every"] or 0), ck_every=0)
        self.runner = StepRunner(self.h_model, [p for p in self.h_model.parameters() if p.requires_grad], h_opt,
                                 scaler, driver, cfg, self.device, amp, self.state.stats)
        self.n_steps = 10 ** 6   # the position within the "epoch" only feeds the (constant) schedule
        # the bare side: its own copy of the criterion, the model and an identical optimizer
        self.b_crit = copy.deepcopy(driver.criterion)
        self.b_opt = sgd(self.b_model)
        self.b_amp = amp
        self.h_model.train()
        self.b_model.train()
        self.i = 0

    def harness_steps(self, k: int) -> None:
        for _ in range(k):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            step = self.trainer.global_step
            self.runner(x, y, 0, step, self.n_steps, step)
            self.trainer.after_step(self.state, 0, step, self.n_steps)
        if len(self.state.stats.pending) > 10_000:   # the loop reads them every epoch
            self.state.stats.flush()

    def bare_steps(self, k: int, start: Optional[int] = None) -> None:
        model, crit, opt, dev = self.b_model, self.b_crit, self.b_opt, self.device
        for j in range(k):
            x, y = self.batches[((start if start is not None else self.i) + j) % len(self.batches)]
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if self.b_amp is None:
                logits = model(x)
            else:
                with torch.autocast(device_type=dev.type, dtype=self.b_amp):
                    logits = model(x)
            loss = crit(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def check_same(case: str, device: str = "cpu", steps: int = 3) -> float:
    """Max |difference| of the weights after ``steps`` identical steps of the harness and the bare loop."""
    with tempfile.TemporaryDirectory() as d:
        p = Pair(case, device, steps, d, ["data.augment=false"])
        p.harness_steps(steps)
        p.bare_steps(steps, start=0)
        p.state.stats.flush()
        a, b = p.h_model.state_dict(), p.b_model.state_dict()
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def measure(case: str, device: str, rounds: int, steps: int, warmup: int) -> Dict:
    with tempfile.TemporaryDirectory() as d:
        p = Pair(case, device, max(steps, 8), d)
        p.harness_steps(warmup)
        p.bare_steps(warmup)
        p.sync()
        th, tb, ratios = [], [], []
        for r in range(rounds):
            order = ("h", "b") if r % 2 == 0 else ("b", "h")
            t = {}
            for side in order:
                t0 = time.perf_counter()
                (p.harness_steps if side == "h" else p.bare_steps)(steps)
                p.sync()
                t[side] = time.perf_counter() - t0
            th.append(t["h"])
            tb.append(t["b"])
            ratios.append(t["b"] / t["h"])   # harness throughput / bare throughput
        p.state.stats.flush()
        imgs = steps * p.bs
        arch = p.cfg["model"]["arch"]
        return {"case": case, "arch": arch, "batch": p.bs, "device": str(p.device), "threads": torch.get_num_threads(),
                "harness_img_s": imgs / min(th), "bare_img_s": imgs / min(tb), "ratio": min(tb) / min(th),
                "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                "rounds": rounds, "steps": steps}


def table(rows: List[Dict]) -> str:
    lines = ["| case | model | batch | device, threads | rounds × steps | harness img/s | bare img/s | harness ÷ bare "
             "| per-round ratio: median (range) | target |", "|---|---|--:|---|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        ok = "✓" if r["ratio"] >= 0.95 else "✗"
        lines.append(f"| {r['case']} | {r['arch']} | {r['batch']} | {r['device']}, {r['threads']} | "
                     f"{r['rounds']} × {r['steps']} | {r['harness_img_s']:.0f} | {r['bare_img_s']:.0f} | "
                     f"{r['ratio']:.3f} | {r['ratio_median']:.3f} ({r['ratio_min']:.3f}–{r['ratio_max']:.3f}) | "
                     f"≥0.95 {ok} |")
    return "\n".join(lines)


def write_readme(path: str, cmd: str, text: str) -> None:
    if not replace_marked_block(path, START, END, f"\n`{cmd}`\n\n{text}\n"):
        raise SystemExit(f"{path}: no {START} ... {END} markers")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/bench_harness.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="digits,cifar", help="comma list of %s" % sorted(CASES))
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds per case (default: 40 digits, 8 cifar)")
    ap.add_argument("--steps", type=int, default=0, help="steps per timed block (default: 50 digits, 3 cifar)")
    ap.add_argument("--readme", default=None, help="rewrite the harness-bench block of this Markdown file")
    a = ap.parse_args(argv)
    defaults = {"digits": (40, 50), "cifar": (8, 3)}
    rows = []
    threads = torch.get_num_threads()
    load0 = os.getloadavg()[0]
    for case in [c.strip() for c in a.cases.split(",") if c.strip()]:
        if case not in CASES:
            raise SystemExit(f"--cases: unknown case {case!r}; allowed: {sorted(CASES)}")
        torch.set_num_threads(threads)   # a recipe's num_threads (digits: 1) must not carry over to the next
        diff = check_same(case, a.device)
        if diff > 1e-5:
            raise SystemExit(f"{case}: the harness and the bare loop disagree after 3 steps (max |dw| {diff:.3g})")
        rounds, steps = a.rounds or defaults[case][0], a.steps or defaults[case][1]
        r = measure(case, a.device, rounds, steps, warmup=max(2, steps // 2))
        print(f"{case}: harness {r['harness_img_s']:.0f} img/s, bare {r['bare_img_s']:.0f} img/s, ratio "
              f"{r['ratio']:.3f} (per round: median {r['ratio_median']:.3f}, {r['ratio_min']:.3f}-{r['ratio_max']:.3f})",
              flush=True)
        rows.append(r)
    text = table(rows) + (f"\n\nLoad average (1 min) of the machine: {load0:.1f} at the start, "
                          f"{os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} CPUs).")
    print(text)
    if a.readme:
        args = [x for x in (sys.argv[1:] if argv is None else argv)]
        write_readme(a.readme, "python bench/bench_harness.py " + " ".join(args), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
