"""The training step never makes the host wait for the device: on the CPU, no host read of a tensor's value
(``aten::_local_scalar_dense`` under ``item()``/``float()``/``bool()``, ``nonzero``, ``equal``, ...) happens
inside ``StepRunner.__call__``, counted with the profiler (it records the ops that C++ code calls, too).
Loss statistics are read at the logging interval instead, where a non-finite loss is located."""
import math
import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ltkernels.train import build_config, fused_available, train
from ltkernels.train.engine import LossStats, StepRunner

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DIGITS = os.path.join(REPO, "configs", "digits_lt.yaml")
TINY = ["num_threads=1", "model.width=4", "train.tensorboard=false", "train.figures=false", "train.progress=false",
        "data.eval_batch_size=500", "train.resume=false"]
STEP = "ltk_test_train_step"
# ops that read a device value on the host (on a GPU each waits for the queue to drain); on the CPU only
# _local_scalar_dense is reached by item()/float()/bool()/int(), the others are data-dependent shapes
HOST_READS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
              "aten::equal", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim"}


def _ancestors(e):
    p = e.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def _host_seed_read(e, chain) -> bool:
    """The fused GCL/GCLAng losses read their seed: a one-element int64 tensor drawn on the CPU generator on
    every device (ltkernels.functional.draw_seed), so reading it never waits for a device."""
    return e.input_shapes in ([[1]], [[1], []]) and any(p.name == "ltkernels::margin_ce" for p in chain)


def host_reads_per_step(monkeypatch, cfg, steps: int) -> tuple:
    """(steps run, host reads inside them with the chain of ops that made each) for a training run of cfg;
    the profiler runs from the first step to the end of step ``steps`` (not over setup and evaluation)."""
    call = StepRunner.__call__
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    done = []

    def marked(self, *a, **k):
        if not done:
            prof.start()
        with record_function(STEP):
            out = call(self, *a, **k)
        done.append(1)
        if len(done) == steps:
            prof.stop()
        return out
    monkeypatch.setattr(StepRunner, "__call__", marked)
    train(cfg, log=lambda *a: None)
    assert len(done) == steps
    events = prof.events()
    reads = []
    for e in events:
        if e.name in HOST_READS:
            chain = list(_ancestors(e))
            if any(p.name == STEP for p in chain) and not _host_seed_read(e, chain):
                reads.append(" < ".join([e.name] + [p.name for p in chain]))
    return sum(1 for e in events if e.name == STEP), reads


RUN = ["optim.epochs=11", "train.max_steps_per_epoch=1", "eval.every=0", "stage2=null", "train.log_every=3",
       "optim.warmup_epochs=1"]   # 11 epochs: FBL's alpha(t) needs more than 10
IMPL = "loss.impl=" + ("fused" if fused_available() else "reference")


# method=ce is the control below (its only reads are the injected ones)
@pytest.mark.parametrize("ov", [
    ["method=ldam_drw", "loss.drw_epoch=5", "optim.grad_clip=1.0"],
    ["method=kps_ga", "loss.ga_epoch=5"],
    ["method=fbl", "train.amp=bf16"],
    ["method=gcl", "model.channels_last=true"],                        # mixup, two noise draws
    ["method=gcl", "train.mixup_noise=one", "loss.noise=injected"],    # shared / injected noise
    ["method=decoupled"],                                              # regulariser terms logged
], ids=["ldam_drw-clip", "kps_ga", "fbl-bf16", "gcl-mixup-channels_last", "gcl-injected", "decoupled"])
def test_no_host_read_in_the_training_step(tmp_path, monkeypatch, ov):
    cfg = build_config(DIGITS, TINY + RUN + [IMPL, f"output_dir={tmp_path}"] + ov)
    steps, reads = host_reads_per_step(monkeypatch, cfg, 11)
    assert steps == 11
    assert reads == [], f"{len(reads) / steps:.1f} host reads per step, e.g. {reads[:3]}"
    if "method=decoupled" in ov:   # the regulariser terms reach the epoch rows without per-step reads
        row = open(tmp_path / "metrics.csv").read().splitlines()
        assert {"train_ce", "train_uniformity", "train_feature_norm"} <= set(row[0].split(","))


def test_the_count_sees_a_host_read(tmp_path, monkeypatch):
    """The counter is not blind: a float() of the loss inside the step (what the step did before) is found
    once per step, also when it happens in C++ below the Python call."""
    from ltkernels.train.loss_factory import LossDriver
    call = LossDriver.__call__

    def reading(self, *a, **k):
        loss = call(self, *a, **k)
        float(loss.detach())
        torch.isfinite(loss).all().item()
        return loss
    monkeypatch.setattr(LossDriver, "__call__", reading)
    cfg = build_config(DIGITS, TINY + RUN + [IMPL, f"output_dir={tmp_path}", "method=ce"])
    steps, reads = host_reads_per_step(monkeypatch, cfg, 11)
    assert steps == 11 and len(reads) == 2 * steps


# ------------------------------------------------------------------------------------------ the interval read
def test_loss_stats_running_means_and_terms():
    s = LossStats()
    vals = [(1.5, 4), (2.25, 4), (0.5, 2)]
    for i, (v, n) in enumerate(vals):
        s.record(0, i, n, torch.tensor(v), {"u": torch.tensor(2 * v)})
    assert s.running["n"] == 0   # nothing read before the interval ends
    s.flush()
    mean = sum(v * n for v, n in vals) / 10
    assert s.means() == {"train_loss": pytest.approx(mean), "train_u": pytest.approx(2 * mean)}
    assert s.pending == [] and s.running["n"] == 10


def test_non_finite_loss_is_located_at_the_interval(tmp_path, monkeypatch):
    """A NaN loss at global step 4 (epoch 1, step 1) stops the run at the next read (log_every=3: after global
    step 5), naming its epoch and step; the last checkpoint (every 2 steps: after step 3) predates it."""
    from ltkernels.train.loss_factory import LossDriver
    call, seen = LossDriver.__call__, []

    def nan_at_4(self, *a, **k):
        loss = call(self, *a, **k)
        seen.append(1)
        return loss * float("nan") if len(seen) == 5 else loss
    monkeypatch.setattr(LossDriver, "__call__", nan_at_4)
    cfg = build_config(DIGITS, TINY + [IMPL, f"output_dir={tmp_path}", "method=ce", "optim.epochs=3",
                                       "train.max_steps_per_epoch=3", "eval.every=0", "train.log_every=3",
                                       "train.ckpt_every_steps=2"])
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at epoch 1 step 1"):
        train(cfg, log=lambda *a: None)
    assert len(seen) == 6   # the run went on to the end of the interval, not beyond
    ck = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values()
                                          if v.is_floating_point())
    assert math.isfinite(ck["running"]["loss"])
