"""``ltk-train --config digits_lt [key.sub=value ...]`` (also ``python -m ltkernels.train``).

``--config`` takes a packaged recipe by name (``ltk-train --list-configs``) or a YAML file by path.
Multi-process: ``torchrun --nproc_per_node 2 -m ltkernels.train --config ...`` (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="ltk-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="digits_lt",
                    help="packaged recipe name or YAML path (default: %(default)s)")
    ap.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    ap.add_argument("--list-configs", action="store_true", help="print the packaged recipe names and exit")
    ap.add_argument("--config-keys", action="store_true",
                    help="print every config key (type, default, meaning) as a Markdown table and exit")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. method=gcl optim.epochs=5")
    a = ap.parse_args(argv)
    from .config import ConfigError, available_recipes, build_config, schema_markdown
    if a.list_configs:
        print("\n".join(available_recipes()))
        return 0
    if a.config_keys:
        print(schema_markdown())
        return 0
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
