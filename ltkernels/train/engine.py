"""Training loop: SGD + warm-up + multistep/cosine, DRW / KPS-GA / FBL hooks, mixup (official two-call form),
AMP, gradient clipping, DDP (torchrun; gloo on CPU, nccl on GPU), atomic checkpoints with exact resume,
two-stage recipes (GCL stage 2, cRT, LWS), evaluation, CSV/TensorBoard logs and figures.

The step (:class:`StepRunner`) does not synchronise the host with the device: losses stay on the device
(:class:`LossStats`) until the logging interval. GPU options: channels_last, torch.compile of the backbone,
SyncBatchNorm under DDP (:func:`apply_model_options`), persistent prefetching workers and pinned memory
(:func:`loader_options`)."""
from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from ..data import LTSampler, build_datasets
from ..models import LWSHead, build_model, make_head
from .config import ConfigError, stage_configs
from .loss_factory import LossDriver, default_head, fused_available
from .metrics import collect_outputs, format_table, metrics_from_summary, summarize
from .schedule import lr_at

CKPT_VERSION = 1
GROUPS = ("many", "medium", "few")


# ---------------------------------------------------------------------------------------------------------
# infrastructure
# ---------------------------------------------------------------------------------------------------------
def dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device_kind: str) -> bool:
    """Initialises the process group when launched by torchrun (WORLD_SIZE > 1). Returns True if it did."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        return True
    return False


def pick_device(cfg) -> torch.device:
    want = cfg.get("device", "auto")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA device is available; allowed values are ['auto', 'cpu', 'cuda']")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_save(obj, path: str) -> None:
    """torch.save to ``path.tmp`` then os.replace: a kill never leaves a truncated checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def config_hash(cfg: dict) -> str:
    keep = {k: v for k, v in cfg.items() if k not in ("train", "output_dir", "methods", "name")}
    keep["train"] = {k: v for k, v in cfg["train"].items()
                     if k in ("mixup_alpha", "mixup_noise", "amp", "max_steps_per_epoch")}
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


def all_gather_cat(d: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    rank, ws = dist_info()
    if ws == 1:
        return d
    parts = [None] * ws
    dist.all_gather_object(parts, {k: v.cpu() for k, v in d.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in d}


# ---------------------------------------------------------------------------------------------------------
# helpers used by the loop
# ---------------------------------------------------------------------------------------------------------
def resolve_head(cfg: dict) -> str:
    h = cfg["model"]["head"]
    return default_head(cfg["loss"]["name"]) if h == "auto" else h


def make_posthoc(cfg: dict, model: nn.Module, cls_num_list) -> Optional[Callable]:
    kind = cfg["eval"].get("posthoc", "none")
    tau = float(cfg["eval"].get("tau", 1.0))
    if kind == "none":
        return None
    if kind == "logit_adjust":
        prior = torch.as_tensor(cls_num_list, dtype=torch.float64)
        logp = torch.log(prior / prior.sum() + 1e-12).float()
        return lambda z, f: z - tau * logp.to(z.device)
    if kind == "tau_norm":
        head = unwrap(model).head
        if not isinstance(head, nn.Linear):
            raise ConfigError("eval.posthoc='tau_norm' needs model.head='linear'")

        def fn(z, f):
            W = head.weight.float()
            return f @ (W / W.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau)).t()
        return fn
    raise ConfigError(f"eval.posthoc={kind!r}: allowed values are ['none', 'tau_norm', 'logit_adjust']")


def eval_loader(dataset, cfg: dict, device: torch.device) -> DataLoader:
    """The evaluation DataLoader of one split (this rank's shard under DDP: samples r, r+W, ...)."""
    rank, ws = dist_info()
    ds = Subset(dataset, list(range(rank, len(dataset), ws))) if ws > 1 else dataset
    return DataLoader(ds, batch_size=cfg["data"]["eval_batch_size"], shuffle=False,
                      **loader_options(cfg["data"], device))


def evaluate(model, dataset, cfg, device, cls_num_list, num_classes, logit_scale, amp_dtype=None,
             loader: Optional[DataLoader] = None) -> Dict:
    """Sharded over DDP ranks (rank r takes samples r, r+W, ...); per-sample summaries are gathered.
    ``loader``: a cached :func:`eval_loader` of ``dataset`` (one is built when None)."""
    loader = loader if loader is not None else eval_loader(dataset, cfg, device)
    posthoc = make_posthoc(cfg, model, cls_num_list)
    fmt = torch.channels_last if cfg["model"].get("channels_last") else None
    logits, targets, fn = collect_outputs(unwrap(model), loader, device, amp_dtype, posthoc, memory_format=fmt)
    S = all_gather_cat(summarize(logits, targets, fn, logit_scale))
    e = cfg["eval"]
    out = metrics_from_summary(S, num_classes, cls_num_list, e["many"], e["few"], e["ece_bins"])
    if e.get("nc_metrics"):  # neural-collapse statistics of the features (ltkernels.regularisers)
        from ..regularisers import nc_eval_metrics
        out.update(nc_eval_metrics(unwrap(model), loader, device, num_classes, amp_dtype))
    return out


def prepare_stage(model, scfg: dict, stage: int, num_classes: int) -> None:
    """Stage 2: freeze the backbone (kept in eval mode by the loop) and set up the head
    (keep = initialised from stage 1, reinit = fresh head (cRT), lws = learnable per-class scales)."""
    if stage == 0:
        return
    if scfg.get("freeze_backbone", True):
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    hi = scfg.get("head_init", "keep")
    device = next(model.backbone.parameters()).device
    if hi == "reinit":
        feat = model.head.in_features
        model.head = make_head(resolve_head(scfg), feat, num_classes, scfg["model"].get("cosine_impl", "eager"))
    elif hi == "lws":
        if not isinstance(model.head, nn.Linear):
            raise ConfigError("stage2.head_init='lws' needs a linear stage-1 head (model.head='linear')")
        model.head = LWSHead(model.head)
    model.head.to(device)   # a new head (or the LWS scales) is made on the CPU; the model may be on a GPU


def mixup(x, y, alpha: float):
    """Official GCL/LDAM form: λ ~ Beta(α, α) from numpy, one batch permutation (global torch RNG)."""
    lam = float(np.random.beta(alpha, alpha)) if alpha > 0 else 1.0
    index = to_device(torch.randperm(x.size(0)), x.device)
    return lam * x + (1 - lam) * x[index], y, y[index], lam


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor made on the CPU (a permutation, a noise draw) copied without blocking the host: pinned
    first on CUDA, since a copy from pageable memory is synchronous."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def loader_options(d: dict, device: torch.device) -> dict:
    """DataLoader keyword arguments of the ``data`` section: workers (persistent, prefetching) when
    ``num_workers > 0``, pinned memory on CUDA (the copies are then asynchronous)."""
    kw = {"num_workers": int(d["num_workers"]), "pin_memory": device.type == "cuda"}
    if kw["num_workers"] > 0:   # torch rejects these without workers; a CPU run with num_workers=0 ignores them
        kw["persistent_workers"] = bool(d.get("persistent_workers"))
        if d.get("prefetch_factor"):
            kw["prefetch_factor"] = int(d["prefetch_factor"])
    return kw


def apply_model_options(model: nn.Module, m: dict, t: dict, device: torch.device, world_size: int,
                        log: Callable[[str], None] = print) -> nn.Module:
    """``model.sync_bn`` (SyncBatchNorm under DDP on GPUs), placement on ``device``, ``model.channels_last`` and
    ``train.compile`` (the backbone, compiled in place so that state-dict keys do not change)."""
    if m.get("sync_bn") and world_size > 1:
        if device.type == "cpu":   # SyncBatchNorm has no CPU kernel: keep per-rank statistics
            log("model.sync_bn=true ignored on the CPU (SyncBatchNorm needs a GPU); BatchNorm statistics stay "
                "per rank")
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if m.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    if t.get("compile"):
        model.backbone.compile(mode=t.get("compile_mode", "default"), backend=t.get("compile_backend", "inductor"))
    return model


class LossStats:
    """Per-step losses (and regulariser terms) kept as device tensors and read at the logging interval, so
    that the step itself never waits for the device. :meth:`flush` reads them in one transfer, raises on the
    first non-finite loss (naming its epoch and step) and advances ``running`` in step order.

    ``running``: ``{"loss": sum of loss·n, "n": samples, "terms": {name: [sum of term·n, n]}}``, kept in the
    checkpoint."""

    def __init__(self, running: Optional[dict] = None):
        self.running = running if running is not None else {}
        self.running.setdefault("loss", 0.0)
        self.running.setdefault("n", 0)
        self.running.setdefault("terms", {})
        self.pending: List[tuple] = []

    def record(self, epoch: int, step: int, n: int, loss: torch.Tensor, terms: Dict[str, torch.Tensor]) -> None:
        self.pending.append((epoch, step, n, loss.detach(), terms))

    def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        flat = [p[3].float() for p in pending] + [v.detach().float() for p in pending for v in p[4].values()]
        vals = torch.stack(flat).tolist()   # the one device-to-host read of the interval
        terms = vals[len(pending):]
        r = self.running
        for (epoch, step, n, _, tm), v in zip(pending, vals):
            if not math.isfinite(v):
                raise FloatingPointError(f"non-finite loss {v} at epoch {epoch} step {step}")
            r["loss"] += v * n
            r["n"] += n
            for k in tm:
                acc = r["terms"].setdefault(k, [0.0, 0])
                acc[0] += terms.pop(0) * n
                acc[1] += n

    def means(self) -> Dict[str, float]:
        """``train_loss`` and ``train_<term>``: the means over the samples flushed so far."""
        r = self.running
        out = {"train_loss": r["loss"] / max(1, r["n"])}
        out.update({f"train_{k}": s / max(1, n) for k, (s, n) in sorted(r["terms"].items())})
        return out


class StepRunner:
    """One optimisation step of a stage: learning rate, asynchronous copy of the batch, mixup, forward under
    autocast, the loss (with injected or shared cloud noise where configured), backward, clipping, the
    optimizer step and the loss statistics. Nothing in it reads a device value on the host."""

    def __init__(self, model: nn.Module, params: List[torch.Tensor], opt: torch.optim.Optimizer, scaler,
                 driver, scfg: dict, device: torch.device, amp_dtype, stats: LossStats, rank: int = 0):
        self.model, self.params, self.opt, self.scaler, self.driver = model, params, opt, scaler, driver
        self.scfg, self.device, self.amp_dtype, self.stats, self.rank = scfg, device, amp_dtype, stats, rank
        self.optim = scfg["optim"]
        self.alpha = float(scfg["train"]["mixup_alpha"] or 0)
        self.one_noise = scfg["train"]["mixup_noise"] == "one"
        self.injected = scfg["loss"]["noise"] == "injected"
        self.clip = float(self.optim["grad_clip"]) if self.optim.get("grad_clip") else None
        self.channels_last = bool(scfg["model"].get("channels_last"))
        self.keep_last = False   # keep (logits, features, target) of the step in .last (the reference check)
        self.last = None

    def autocast(self):
        """The forward's autocast context; none at all without AMP (building a disabled one costs more than a
        small model's layer)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def noise(self, shape, global_step: int, call: int) -> torch.Tensor:
        gen = noise_generator(self.scfg["seed"], global_step, call, self.rank) if self.injected else None
        return to_device(torch.randn(shape, generator=gen) / 3.0, self.device)

    def __call__(self, x, y, epoch: int, step: int, n_steps: int, global_step: int) -> None:
        lr = lr_at(self.optim, epoch, step, n_steps)
        for pg in self.opt.param_groups:
            pg["lr"] = lr
        fmt = torch.channels_last if self.channels_last and x.dim() == 4 else torch.preserve_format
        x = x.to(self.device, non_blocking=True, memory_format=fmt)
        y = torch.as_tensor(y).to(self.device, non_blocking=True)
        if self.alpha > 0:
            x, ya, yb, lam = mixup(x, y, self.alpha)
        with self.autocast():
            logits, feats = self.model(x, return_features=True)
        logits, feats = logits.float(), feats.float()
        driver = self.driver
        shared = None
        if driver.takes_noise and self.alpha > 0 and self.one_noise:
            # one cloud-noise draw for both mixup terms (the official code draws twice)
            shared = self.noise(logits.shape, global_step, 0)

        def crit(target, call):
            noise = shared
            if noise is None and driver.takes_noise and self.injected:
                noise = self.noise(logits.shape, global_step, call)
            return driver(logits, feats, target, noise), driver.last_terms()

        if self.alpha > 0:
            (la, ta), (lb, tb) = crit(ya, 0), crit(yb, 1)
            loss = lam * la + (1 - lam) * lb
            terms = {k: lam * ta[k] + (1 - lam) * tb[k] for k in ta if k in tb}
        else:
            loss, terms = crit(y, 0)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip is not None:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.scaler.step(self.opt)   # with fp16 GradScaler this reads the inf check (torch's design)
        self.scaler.update()
        self.stats.record(epoch, step, len(y), loss, terms)
        if self.keep_last:
            self.last = (logits.detach(), feats.detach(), y)


def noise_generator(seed: int, step: int, call: int, rank: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 4 + call) * 64 + rank)
    return g


# ---------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------
@dataclass
class StageState:
    """What the loop, the bookkeeping between steps and the checkpoint share within one stage.

    The first fields are what :meth:`Trainer.after_step` and :meth:`Trainer.save` read; the rest are the
    pieces :meth:`Trainer.fit_stage` builds for its steps (None where a caller, e.g. bench/bench_harness.py,
    drives the step itself)."""
    si: int
    cfg: dict
    model: nn.Module
    opt: torch.optim.Optimizer
    scaler: object
    sampler: LTSampler
    best: dict
    stats: LossStats
    log_every: int = 0
    ck_every: int = 0
    progress: object = None
    params: Optional[List[torch.Tensor]] = None   # the trainable parameters (stage 2: the head's)
    wrapped: Optional[nn.Module] = None   # the model as the step and evaluation call it (DDP under torchrun)
    driver: object = None                 # the loss of loss.impl (a LossDriver)
    other: object = None                  # the other implementation's loss, when train.ref_check_every > 0
    ref_every: int = 0
    logit_scale: float = 1.0              # the evaluation's logit scale (eval.logit_scale, or the loss's)
    per_rank_bs: int = 0
    best_path: str = ""
    runner: Optional["StepRunner"] = None
    loader: Optional[DataLoader] = None
    loader_gen: Optional[torch.Generator] = None   # the training loader's generator, re-seeded every epoch


class Trainer:
    def __init__(self, cfg: dict, log: Callable[[str], None] = print):
        self.cfg = cfg
        if cfg.get("num_threads"):
            torch.set_num_threads(int(cfg["num_threads"]))
        self.device = pick_device(cfg)
        self.owns_pg = setup_distributed(self.device.type)
        self.rank, self.ws = dist_info()
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self.out = cfg["output_dir"]
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)
        self.ckpt_path = os.path.join(self.out, "checkpoint.pt")
        self.stages = stage_configs(cfg)
        self.hash = config_hash(cfg)
        amp = cfg["train"]["amp"]
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.tb = None
        self.ref_rows: List[dict] = []

    # --------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.time()
        cfg = self.cfg
        seed_all(cfg["seed"])
        ds = build_datasets(cfg["data"], cfg["seed"])
        self.ds = ds
        C, counts = ds["num_classes"], ds["cls_num_list"]
        self.model = apply_model_options(build_model({**cfg["model"], "head": resolve_head(cfg)}, C), cfg["model"],
                                         cfg["train"], self.device, self.ws, self.log)
        self._eval_loaders: Dict[int, DataLoader] = {}
        state = None
        if cfg["train"]["resume"] and os.path.exists(self.ckpt_path):
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
            if state.get("config_hash") != self.hash:
                raise ConfigError(f"{self.ckpt_path} was written by a different config; delete it, change "
                                  f"output_dir, or set train.resume=false")
            if state.get("done"):
                self.log(f"[{cfg['name']}] already finished; summary from {self.ckpt_path}")
                return state["summary"]
            self.log(f"[{cfg['name']}] resuming stage {state['stage'] + 1} epoch {state['epoch']} "
                     f"step {state['step']}")
        if state is None and self.rank == 0:   # a fresh run never appends to an older run's logs
            import glob
            import shutil
            for f in ["metrics.csv", "refcheck.csv", "summary.json"] + [os.path.basename(p) for p in
                                                                       glob.glob(os.path.join(self.out, "best_stage*.pt"))]:
                if os.path.exists(os.path.join(self.out, f)):
                    os.remove(os.path.join(self.out, f))
            shutil.rmtree(os.path.join(self.out, "tb"), ignore_errors=True)
        self.history: List[dict] = state["history"] if state else []
        self.stage_results: List[dict] = state["stage_results"] if state else []
        self.global_step = state["global_step"] if state else 0
        if state is not None and self.rank == 0 and os.path.exists(os.path.join(self.out, "metrics.csv")):
            os.remove(os.path.join(self.out, "metrics.csv"))   # rewritten from the checkpoint's history
            for row in self.history:
                self.log_row(row, quiet=True)
        if self.rank == 0 and cfg["train"]["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(self.out, "tb"))
            except Exception as e:  # noqa: BLE001
                self.log(f"tensorboard disabled: {e}")
        if self.rank == 0:
            import yaml
            with open(os.path.join(self.out, "config.yaml"), "w") as f:
                yaml.safe_dump(cfg, f, sort_keys=False)
        for si, scfg in enumerate(self.stages):
            if state is not None and si < state["stage"]:
                prepare_stage(self.model, scfg, si, C)   # rebuild the later stages' structure
                continue
            if state is None or si > state["stage"]:
                if si > 0 and scfg.get("init") == "best" and self.stage_results[-1].get("best_path"):
                    self.model.load_state_dict(torch.load(self.stage_results[-1]["best_path"],
                                                          map_location="cpu", weights_only=False))
                prepare_stage(self.model, scfg, si, C)
                res = self.fit_stage(si, scfg, None)
            else:
                prepare_stage(self.model, scfg, si, C)
                res = self.fit_stage(si, scfg, state)
            self.stage_results.append(res)
            state = None
        summary = self.finish(time.time() - t0 + (0.0))
        return summary

    # --------------------------------------------------------------------------------------------------
    def fit_stage(self, si: int, scfg: dict, state: Optional[dict]) -> dict:
        """Train stage ``si`` for its ``optim.epochs`` (from the checkpoint ``state`` when it resumes this
        stage) and test its last and best-by-validation models; returns the stage's result row.

        The checkpoint goes in once the optimizer and scaler it restores exist, after the loss drivers, the
        sampler and the DDP wrapper (the order this loop has always had), and before the step runner is built
        (the runner takes the restored running loss of an interrupted epoch)."""
        st = self.build_stage(si, scfg)
        start_epoch, start_step = self.restore_stage(st, state)
        self.build_loop(st)
        for epoch in range(start_epoch, int(scfg["optim"]["epochs"])):
            self.train_epoch(st, epoch, start_step if epoch == start_epoch else 0)
            self.end_epoch(st, epoch)
        return self.test_stage(st)

    # -- fit_stage's steps ------------------------------------------------------------------------------
    def build_stage(self, si: int, scfg: dict) -> StageState:
        """The stage's optimizer, gradient scaler, loss driver(s), sampler and DDP wrapper, with a fresh
        start's best-so-far and loss statistics (:meth:`restore_stage` replaces them on a resume)."""
        model = self.model
        o = scfg["optim"]
        params = [p for p in model.parameters() if p.requires_grad]   # a frozen backbone is not optimised
        opt = torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"],
                              nesterov=o["nesterov"])
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda")
        t = scfg["train"]
        ref_every = int(t["ref_check_every"] or 0)
        driver, other = self.make_drivers(scfg, compare=ref_every > 0)
        logit_scale = driver.logit_scale if scfg["eval"]["logit_scale"] == "auto" else float(scfg["eval"]["logit_scale"])
        d = scfg["data"]
        per_rank_bs = d["batch_size"] // self.ws
        if per_rank_bs * self.ws != d["batch_size"]:
            raise ConfigError(f"data.batch_size={d['batch_size']} (global) must be divisible by the world size {self.ws}")
        sampler = LTSampler(self.ds["train"].targets, d["sampler"], seed=scfg["seed"] + 7 * si, rank=self.rank,
                            world_size=self.ws, class_aware_k=d["class_aware_k"], beta=d["sampler_beta"],
                            cben_a=d["cben_a"], cben_b=d["cben_b"])
        wrapped = model
        if self.ws > 1:
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return StageState(si=si, cfg=scfg, model=model, opt=opt, scaler=scaler, sampler=sampler,
                          best={"top1": -1.0, "epoch": -1}, stats=LossStats(), log_every=int(t["log_every"] or 0),
                          ck_every=int(t["ckpt_every_steps"] or 0), params=params, wrapped=wrapped, driver=driver,
                          other=other, ref_every=ref_every, logit_scale=logit_scale,
                          per_rank_bs=per_rank_bs, best_path=os.path.join(self.out, f"best_stage{si + 1}.pt"))

    def make_drivers(self, scfg: dict, compare: bool) -> Tuple[LossDriver, Optional[LossDriver]]:
        """``(driver, other)``: the loss of ``loss.impl`` and, with ``compare`` (``train.ref_check_every > 0``),
        the same loss in the other implementation for :meth:`reference_check` (else None). Both act on the model's head
        (the regularised losses of ltkernels.regularisers read its weight)."""
        counts, E = self.ds["cls_num_list"], int(scfg["optim"]["epochs"])
        driver = LossDriver(scfg["loss"], counts, E, device=self.device)
        driver.bind_head(self.model.head)
        other = None
        if compare:
            other_impl = "reference" if driver.impl == "fused" else "fused"
            if other_impl == "fused" and not fused_available():
                raise ConfigError("train.ref_check_every > 0 compares loss.impl with the other implementation, "
                                  "but ltkernels.losses (fused) is not importable")
            other = LossDriver(scfg["loss"], counts, E, device=self.device, impl=other_impl)
            other.bind_head(self.model.head)
        return driver, other

    def restore_stage(self, st: StageState, state: Optional[dict]) -> Tuple[int, int]:
        """Put a checkpoint of this stage back (weights, optimizer, scaler, best-so-far, the running loss of
        an interrupted epoch, this rank's RNG state); returns ``(epoch, step)`` to continue from, ``(0, 0)``
        for a fresh stage."""
        if state is None:
            return 0, 0
        st.model.load_state_dict(state["model"])
        st.opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            st.scaler.load_state_dict(state["scaler"])
        st.best = state["best"]
        st.stats = LossStats(state["running"])
        # a checkpoint of fewer ranks than this run has: every rank takes rank 0's state
        set_rng_state(state["rng"][self.rank] if len(state["rng"]) > self.rank else state["rng"][0])
        return state["epoch"], state["step"]

    def build_loop(self, st: StageState) -> None:
        """The step runner and the training loader. One loader for the stage, so that persistent workers
        survive the epochs; its generator (the workers' base seed) is re-seeded per epoch."""
        st.runner = StepRunner(st.wrapped, st.params, st.opt, st.scaler, st.driver, st.cfg, self.device,
                               self.amp_dtype, st.stats, self.rank)
        st.runner.keep_last = st.other is not None   # the reference check re-runs the step's outputs
        d = st.cfg["data"]
        st.loader_gen = torch.Generator()
        st.loader = DataLoader(self.ds["train"], batch_size=st.per_rank_bs, sampler=st.sampler,
                               drop_last=d["drop_last"], generator=st.loader_gen, **loader_options(d, self.device))

    def train_epoch(self, st: StageState, epoch: int, step0: int) -> None:
        """The steps of one epoch, from ``step0`` (> 0 when a mid-epoch checkpoint resumes it), each followed
        by the reference check when one is due and by :meth:`after_step`."""
        n_steps = self.begin_epoch(st, epoch, step0)
        st.progress = self.progress_bar(st, epoch, step0, n_steps)   # after_step shows the running loss on it
        batches = st.progress if st.progress is not None else st.loader
        for step, (x, y) in enumerate(batches, start=step0):
            if step >= n_steps:
                break
            st.runner(x, y, epoch, step, n_steps, self.global_step)
            if st.other is not None and self.global_step % st.ref_every == 0:
                self.reference_check(st.driver, st.other, *st.runner.last, st.cfg, st.si, epoch)
            self.after_step(st, epoch, step, n_steps)

    def begin_epoch(self, st: StageState, epoch: int, step0: int) -> int:
        """Set what depends on the epoch: the losses' schedules (DRW, KPS-GA, FBL), the sampler's draw and its
        start within this rank's shard, the loader's worker seed, the running loss and the train/eval modes.
        Returns the epoch's number of steps (counting the ``step0`` already taken)."""
        scfg = st.cfg
        st.driver.set_epoch(epoch)
        if st.other is not None:
            st.other.set_epoch(epoch)
        st.sampler.set_epoch(epoch)
        st.sampler.set_start(step0 * st.per_rank_bs)
        st.loader_gen.manual_seed(scfg["seed"] * 7919 + epoch * 31 + st.si)
        n_steps = len(st.loader) + step0   # the loader's length counts the steps left after the start
        max_steps = scfg["train"].get("max_steps_per_epoch")
        if max_steps:
            n_steps = min(n_steps, int(max_steps))
        if step0 == 0:   # a mid-epoch resume continues the epoch's running loss from the checkpoint
            st.stats = st.runner.stats = LossStats()
        st.model.train()
        if st.si > 0 and scfg.get("freeze_backbone", True):
            st.model.backbone.eval()   # a frozen backbone keeps its BatchNorm statistics
        return n_steps

    def progress_bar(self, st: StageState, epoch: int, step0: int, n_steps: int):
        """The loader wrapped in a tqdm bar, on rank 0 when ``train.progress`` is set; else None."""
        if not (st.cfg["train"]["progress"] and self.rank == 0):
            return None
        from tqdm import tqdm
        name = self.cfg["name"]
        tag = f"{name} s{st.si + 1}" if len(self.stages) > 1 else name
        E = int(st.cfg["optim"]["epochs"])
        return tqdm(st.loader, total=n_steps - step0, desc=f"{tag} ep {epoch + 1}/{E}", leave=False,
                    dynamic_ncols=True)

    def end_epoch(self, st: StageState, epoch: int) -> None:
        """End of an epoch: evaluate when ``eval.every`` says so (on val, else test), keep the best-by-validation
        weights, append the epoch's row to the history and the logs, checkpoint."""
        scfg = st.cfg
        st.stats.flush()
        row = {"stage": st.si + 1, "epoch": epoch + 1, "lr": lr_at(scfg["optim"], epoch), **st.stats.means()}
        every = int(scfg["eval"]["every"] or 0)
        if every and ((epoch + 1) % every == 0 or epoch + 1 == int(scfg["optim"]["epochs"])):
            ds = self.ds
            eval_set, eval_name = (ds["val"], "val") if ds["val"] is not None else (ds["test"], "test")
            m = self.evaluate_stage(st, eval_set)
            row.update({f"{eval_name}_{k}": v for k, v in m.items() if not isinstance(v, list)})
            row["feat_norm_per_class"] = m.get("feat_norm_per_class")
            selects = scfg["eval"]["select"] == "val" and ds["val"] is not None
            if selects and m["top1"] > st.best["top1"]:
                st.best = {"top1": m["top1"], "epoch": epoch + 1}
                if self.rank == 0:
                    atomic_save(st.model.state_dict(), st.best_path)
        self.history.append(row)
        self.log_row(row)
        self.save(st, epoch + 1, 0, done=False)

    def test_stage(self, st: StageState) -> dict:
        """Stage end: test the last model and, when validation selected an epoch, the best one; the stage's
        result row (``test`` is the selected model's metrics)."""
        best, scfg = st.best, st.cfg
        res = {"stage": st.si + 1, "epochs": int(scfg["optim"]["epochs"]), "loss": scfg["loss"]["name"],
               "best_epoch": best["epoch"], "best_path": st.best_path if best["epoch"] > 0 else None}
        res["test_last"] = self.evaluate_stage(st, self.ds["test"])
        if best["epoch"] > 0:
            res["test_best"] = self.evaluate_best(st, self.ds["test"])
        res["test"] = res.get("test_best", res["test_last"])
        res["selected"] = f"best val epoch {best['epoch']}" if best["epoch"] > 0 else "last epoch"
        self.ref_summary(res)
        return res

    def evaluate_best(self, st: StageState, dataset) -> Dict:
        """Evaluate the best-by-validation weights, then put the last weights back (a later stage starts from
        them unless its ``init`` is ``best``)."""
        last_state = copy.deepcopy(st.model.state_dict())
        if self.ws > 1:
            dist.barrier()   # rank 0 wrote the best weights
        st.model.load_state_dict(torch.load(st.best_path, map_location="cpu", weights_only=False))
        out = self.evaluate_stage(st, dataset)
        st.model.load_state_dict(last_state)
        return out

    def evaluate_stage(self, st: StageState, dataset) -> Dict:
        """:func:`evaluate` of the stage's model on ``dataset`` with the stage's settings and cached loader."""
        return evaluate(st.wrapped, dataset, cfg=st.cfg, device=self.device, cls_num_list=self.ds["cls_num_list"],
                        num_classes=self.ds["num_classes"], logit_scale=st.logit_scale, amp_dtype=self.amp_dtype,
                        loader=self.eval_loader_of(dataset, st.cfg))

    def eval_loader_of(self, dataset, scfg: dict) -> DataLoader:
        """One evaluation loader per split and stage configuration, so that persistent workers are reused."""
        key = (id(dataset), scfg["data"]["eval_batch_size"], scfg["data"]["num_workers"])
        if key not in self._eval_loaders:
            self._eval_loaders[key] = eval_loader(dataset, scfg, self.device)
        return self._eval_loaders[key]

    def after_step(self, st: "StageState", epoch: int, step: int, n_steps: int) -> None:
        """Bookkeeping between steps: the step counter, the loss read every ``train.log_every`` steps (its
        non-finite check included) and the mid-epoch checkpoint every ``train.ckpt_every_steps``."""
        self.global_step += 1
        if st.log_every and self.global_step % st.log_every == 0:
            st.stats.flush()
            mean = st.stats.means()["train_loss"]
            if self.tb is not None:
                self.tb.add_scalar("train_loss_running", mean, self.global_step)
            if st.progress is not None:
                st.progress.set_postfix(loss=f"{mean:.4f}", refresh=False)
        if st.ck_every and self.global_step % st.ck_every == 0 and step + 1 < n_steps:
            self.save(st, epoch, step + 1, done=False)

    # --------------------------------------------------------------------------------------------------
    def reference_check(self, driver, other, logits, feats, y, scfg, si, epoch):
        """Same batch, same (injected) noise through both implementations; logs max |Δloss|, |Δgrad|."""
        g = noise_generator(scfg["seed"] + 99991, self.global_step, 0, self.rank)
        noise = (torch.randn(logits.shape, generator=g) / 3.0).to(logits.device) if driver.takes_noise else None
        outs = []
        for drv in (driver, other):
            z = logits.detach().clone().requires_grad_(True)
            f = feats.detach().clone().requires_grad_(True)
            loss = drv(z, f, y, noise)
            gz, gf = torch.autograd.grad(loss, [z, f], allow_unused=True)
            outs.append((loss.detach(), gz, gf))
        (l1, g1, f1), (l2, g2, f2) = outs
        gd = (g1 - g2).abs().max().item()
        if f1 is not None and f2 is not None:
            gd = max(gd, (f1 - f2).abs().max().item())
        row = {"stage": si + 1, "epoch": epoch + 1, "step": self.global_step, "loss": l1.item(),
               "loss_diff": abs(l1.item() - l2.item()), "grad_diff": gd}
        self.ref_rows.append(row)
        if self.rank == 0:
            path = os.path.join(self.out, "refcheck.csv")
            new = not os.path.exists(path)
            with open(path, "a", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)

    def ref_summary(self, res):
        if self.ref_rows:
            res["ref_check"] = {"checks": len(self.ref_rows),
                                "max_loss_diff": max(r["loss_diff"] for r in self.ref_rows),
                                "max_grad_diff": max(r["grad_diff"] for r in self.ref_rows)}

    # --------------------------------------------------------------------------------------------------
    def save(self, st: "StageState", epoch: int, step: int, done: bool) -> None:
        st.stats.flush()   # a model that saw a non-finite loss is never checkpointed
        rng = get_rng_state()
        if self.ws > 1:
            parts = [None] * self.ws
            dist.all_gather_object(parts, rng)
            rng = parts
        else:
            rng = [rng]
        if self.rank != 0:
            return
        sd = st.sampler.state_dict()
        sd["start"] = step * (self.stages[st.si]["data"]["batch_size"] // self.ws)
        sd["epoch"] = epoch
        atomic_save({"version": CKPT_VERSION, "config_hash": self.hash, "stage": st.si, "epoch": epoch, "step": step,
                     "global_step": self.global_step, "model": st.model.state_dict(), "optimizer": st.opt.state_dict(),
                     "scaler": st.scaler.state_dict() if st.scaler.is_enabled() else None,
                     "scheduler": {"epoch": epoch, "step": step}, "sampler": sd, "rng": rng, "best": st.best,
                     "running": st.stats.running, "history": self.history, "stage_results": self.stage_results,
                     "done": done, "summary": None}, self.ckpt_path)

    def log_row(self, row: dict, quiet: bool = False) -> None:
        if self.rank != 0:
            return
        flat = {k: v for k, v in row.items() if not isinstance(v, list)}
        path = os.path.join(self.out, "metrics.csv")
        exists = os.path.exists(path)
        fields = list(flat)
        if exists:
            with open(path) as fh:
                header = fh.readline().strip().split(",")
            if header != fields:   # the eval columns may appear later (eval.every): rewrite with the union
                rows = list(csv.DictReader(open(path)))
                fields = header + [f for f in fields if f not in header]
                with open(path, "w", newline="") as fh:
                    w = csv.DictWriter(fh, fieldnames=fields)
                    w.writeheader()
                    w.writerows(rows)
        with open(path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            if not exists:
                w.writeheader()
            w.writerow(flat)
        if quiet:
            return
        if self.tb is not None:
            step = row["epoch"] + sum(r["epochs"] for r in self.stage_results)
            for k, v in flat.items():
                if isinstance(v, (int, float)) and k not in ("stage", "epoch") and not math.isnan(v):
                    self.tb.add_scalar(k, v, step)
        keys = [k for k in ("train_loss", "val_top1", "val_few", "test_top1", "test_few") if k in flat]
        self.log(f"[{self.cfg['name']}] stage {row['stage']} epoch {row['epoch']} lr {row['lr']:.4g} " +
                 " ".join(f"{k} {flat[k]:.3f}" for k in keys))

    # --------------------------------------------------------------------------------------------------
    def finish(self, wall: float) -> dict:
        final = self.stage_results[-1]
        e = self.cfg["eval"]
        summary = {"name": self.cfg["name"], "method": self.cfg.get("method"), "loss": self.cfg["loss"]["name"],
                   "impl": self.cfg["loss"]["impl"], "dataset": self.cfg["data"]["dataset"],
                   "cls_num_list": self.ds["cls_num_list"], "thresholds": {"many": e["many"], "few": e["few"]},
                   "test": final["test"], "selected": final["selected"], "stages": self.stage_results,
                   "wall_s": wall, "world_size": self.ws, "output_dir": self.out}
        if self.rank == 0:
            with open(os.path.join(self.out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1, default=float)
            if self.cfg["train"]["figures"]:
                try:
                    from .figures import save_figures
                    save_figures(self.out, self.history, final["test"], self.ds["cls_num_list"], self.cfg["name"])
                except Exception as ex:  # noqa: BLE001 - figures never fail a run
                    self.log(f"figures skipped: {type(ex).__name__}: {ex}")
            t = final["test"]
            self.log(format_table({self.cfg["name"]: t}, extra_header=f"test ({final['selected']}), many > {e['many']}, "
                                  f"few < {e['few']} training images:"))
            if self.tb is not None:
                self.tb.close()
            # mark the checkpoint finished (so a rerun with resume returns the summary)
            st = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
            st["done"], st["summary"] = True, summary
            atomic_save(st, self.ckpt_path)
        if self.ws > 1:
            dist.barrier()
        return summary


def train(cfg: dict, log: Callable[[str], None] = print) -> dict:
    tr = Trainer(cfg, log)
    try:
        return tr.run()
    finally:
        if tr.owns_pg and dist.is_initialized():
            dist.destroy_process_group()
