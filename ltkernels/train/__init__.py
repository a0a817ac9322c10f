"""Training harness: ``ltk-train --config <recipe name or path> [key=value ...]`` (``python -m ltkernels.train``)."""
from .config import DEFAULTS, LOSS_NAMES, ConfigError, build_config, stage_configs
from .engine import Trainer, train
from .loss_factory import LossDriver, fused_available, loss_module
from .metrics import compute_metrics, format_table

__all__ = ["DEFAULTS", "LOSS_NAMES", "ConfigError", "LossDriver", "Trainer", "build_config", "compute_metrics",
           "format_table", "fused_available", "loss_module", "stage_configs", "train"]
