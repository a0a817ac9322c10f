"""``python -m ltkernels.train --config configs/digits_lt.yaml [key.sub=value ...]``

Multi-process: ``torchrun --nproc_per_node 2 -m ltkernels.train --config ...`` (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ltkernels.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/digits_lt.yaml", help="YAML recipe (default: %(default)s)")
    ap.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. method=gcl optim.epochs=5")
    a = ap.parse_args(argv)
    from .config import ConfigError, build_config
    try:
        cfg = build_config(a.config, a.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if a.print_config:
        import yaml
        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    from .engine import train
    try:
        train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
