"""Train several methods of one recipe and print the many/medium/few table.

    ltk-compare --config digits_lt --methods ce,ldam_drw,kps,fbl,gcl
    python -m ltkernels.train.compare --config configs/digits_lt.yaml --methods ce,ldam_drw,kps,fbl,gcl

Every method is a key of the config's ``methods``; each (method, seed) trains from scratch into
``<out>/<method>_s<seed>``. Reported numbers are test accuracies of the model the config selects
(eval.select: last epoch, or best validation epoch — never the test set), mean ± std over seeds."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import List, Optional

import numpy as np

from .._readme import replace_marked_block

COLS = ("many", "medium", "few", "top1", "top5", "ece")


def aggregate(results):
    out = {}
    for c in COLS:
        v = np.array([r["test"][c] for r in results], dtype=float)
        if len(v) == 1 or np.isnan(v).all():
            out[c] = float(v[0]) if len(v) else math.nan
        else:
            out[c] = f"{np.nanmean(v):.2f} ± {np.nanstd(v):.2f}"
    return out


def _write_readme_section(path: str, argv, table: str) -> None:
    start, end = "<!-- digits:start -->", "<!-- digits:end -->"
    args = [x for x in (sys.argv[1:] if argv is None else argv)]
    cmd = "python -m ltkernels.train.compare " + " ".join(args)
    if not replace_marked_block(path, start, end, f"```\n$ {cmd}\n{table}\n```"):
        print(f"{path}: no {start} ... {end} markers; not updated", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="ltk-compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="digits_lt", help="packaged recipe name or YAML path (default: %(default)s)")
    ap.add_argument("--methods", default="ce,ldam_drw,kps,fbl,gcl", help="comma-separated keys of 'methods'")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (e.g. 0,1,2)")
    ap.add_argument("--out", default="runs/compare", help="output root (default: %(default)s)")
    ap.add_argument("--json", default=None, help="also write all summaries to this JSON file")
    ap.add_argument("--readme", default=None,
                    help="also write the table (and this command) between the <!-- digits:start/end --> markers of "
                         "this Markdown file")
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    a = ap.parse_args(argv)
    from .config import ConfigError, build_config
    from .engine import train
    from .metrics import format_table

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    rows, allres, times = {}, {}, {}
    t_all = time.time()
    thresholds = None
    for m in methods:
        res = []
        for s in seeds:
            try:
                cfg = build_config(a.config, [f"method={m}", f"seed={s}", "train.progress=false",
                                              f"output_dir={os.path.join(a.out, f'{m}_s{s}')}",
                                              "train.resume=false"] + list(a.overrides))
            except ConfigError as e:
                print(f"config error: {e}", file=sys.stderr)
                return 2
            t0 = time.time()
            r = train(cfg, log=lambda *x, **k: None)
            dt = time.time() - t0
            t = r["test"]
            print(f"{m:>10s} seed {s}: many {t['many']:.2f} medium {t['medium']:.2f} few {t['few']:.2f} "
                  f"top1 {t['top1']:.2f}  ({dt:.1f} s, {r['selected']})", flush=True)
            res.append(r)
            times.setdefault(m, []).append(dt)
            thresholds = r["thresholds"]
        rows[m] = aggregate(res)
        allres[m] = res
    wall = time.time() - t_all
    hdr = (f"test accuracy (%) on {a.config}, seeds {seeds}; many > {thresholds['many']}, "
           f"medium {thresholds['few']}-{thresholds['many']}, few < {thresholds['few']} training images; "
           f"total wall {wall:.0f} s")
    print()
    table = format_table(rows, COLS, extra_header=hdr)
    print(table)
    if a.readme:
        _write_readme_section(a.readme, argv, table)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "runs": allres, "wall_s": wall, "times": times}, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
