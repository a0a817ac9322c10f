"""Training loop: every loss trains, recipe hooks (DRW, KPS GA, FBL α), schedules, metrics, two-stage
freezing, AMP, kill-and-resume, CLIs, and the reference check (fused vs eager)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ltkernels.train import LOSS_NAMES, LossDriver, build_config, compute_metrics, fused_available, train
from ltkernels.train.schedule import lr_at

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DIGITS = os.path.join(REPO, "configs", "digits_lt.yaml")
IMPLS = ["reference", pytest.param("fused", marks=pytest.mark.skipif(
    not fused_available(), reason="ltkernels.losses (fused) not importable"))]
TINY = ["num_threads=1", "model.width=4", "train.tensorboard=false", "train.figures=false", "train.progress=false",
        "data.eval_batch_size=500"]


def tiny_cfg(tmp_path, *ov):
    return build_config(DIGITS, TINY + [f"output_dir={tmp_path}"] + list(ov))


def state_of(path):
    return torch.load(os.path.join(path, "checkpoint.pt"), map_location="cpu", weights_only=False)["model"]


# ------------------------------------------------------------------------------------------ every loss
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_every_loss_trains(tmp_path, loss, impl):
    extra = ["loss.params={}"] if loss != "gcl_ang" else ["loss.params={m: 0.1, s: 30}"]
    cfg = tiny_cfg(tmp_path, f"loss.name={loss}", f"loss.impl={impl}", "optim.epochs=11",
                   "train.max_steps_per_epoch=1", "eval.every=0", "optim.warmup_epochs=1", *extra)
    s = train(cfg, log=lambda *a: None)
    t = s["test"]
    assert 0 <= t["top1"] <= 100 and math.isfinite(t["ece"])
    assert len(t["per_class_acc"]) == 10 and len(t["feat_norm_per_class"]) == 10


# ------------------------------------------------------------------------------------------ hooks
def cb_weights(n, beta=0.9999):
    n = np.asarray(n, dtype=np.float64)
    w = (1 - beta) / (1 - beta ** n)
    return w / w.sum() * len(n)


def test_drw_switch():
    counts = [50, 20, 5]
    d = LossDriver({"name": "ldam_drw", "impl": "reference", "drw_epoch": 3, "params": {}}, counts, 6)
    d.set_epoch(2)
    assert torch.equal(d.criterion.weight.double(), torch.ones(3, dtype=torch.float64))
    d.set_epoch(3)
    np.testing.assert_allclose(d.criterion.weight.double().numpy(), cb_weights(counts), rtol=1e-6)
    # the weighted loss is the torch-weighted mean (weights change the value)
    z, y = torch.rand(6, 3) * 2 - 1, torch.tensor([0, 1, 2, 2, 1, 0])
    d.set_epoch(0)
    a = d(z, None, y)
    d.set_epoch(5)
    assert not torch.allclose(a, d(z, None, y))


def test_kps_ga_switch_and_fbl_alpha():
    from ltkernels import reference
    counts = [40, 10, 2]
    d = LossDriver({"name": "kps_ga", "impl": "reference", "ga_epoch": 4, "params": {"max_m": 0.2, "s": 15}},
                   counts, 8)
    z, y = torch.rand(5, 3) * 2 - 1, torch.tensor([0, 1, 2, 1, 2])
    d.set_epoch(3)
    torch.testing.assert_close(d(z, None, y), reference.KPSLoss(counts, max_m=0.2, s=15)(z, y))
    d.set_epoch(4)
    torch.testing.assert_close(d(z, None, y), reference.KPSLoss(counts, max_m=0.2, s=15, weighted=True)(z, y))
    f = LossDriver({"name": "fbl", "impl": "reference", "params": {"lambda_": 60}}, counts, 30)
    for t in (0, 7, 25):
        f.set_epoch(t)
        assert f.curr == pytest.approx((t / 20) ** 2)


def test_lr_schedules():
    ldam = {"lr": 0.1, "epochs": 200, "warmup_epochs": 5, "schedule": "multistep", "milestones": [160, 180],
            "milestone_factors": [0.01, 0.0001]}
    got = [lr_at(ldam, e) for e in (0, 3, 4, 159, 160, 179, 180, 199)]
    np.testing.assert_allclose(got, [0.02, 0.08, 0.1, 0.1, 0.001, 0.001, 1e-5, 1e-5])
    gcl = {"lr": 0.1, "epochs": 200, "warmup_epochs": 5, "schedule": "multistep", "milestones": [160, 180],
           "gamma": 0.1}
    np.testing.assert_allclose([lr_at(gcl, e) for e in (160, 180)], [0.01, 0.001])
    s2 = {"lr": 0.002, "epochs": 30, "warmup_epochs": 0, "schedule": "cosine"}
    for e in (0, 10, 29):
        assert lr_at(s2, e) == pytest.approx(0.01 * 0.1 * (1 + math.cos(math.pi * e / 30)))


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_by_hand():
    counts = [150, 50, 5]   # many / medium / few with the real thresholds
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    pred = torch.tensor([0, 0, 1, 0, 1, 2, 0, 0, 0, 0])  # class acc 1, 2/3, 1/5
    logits = torch.full((10, 3), -10.0)
    logits[torch.arange(10), pred] = 10.0   # confidence ~1 everywhere
    m = compute_metrics(logits, y, counts)
    assert m["many"] == pytest.approx(100) and m["medium"] == pytest.approx(200 / 3) and m["few"] == pytest.approx(20)
    assert m["top1"] == pytest.approx(50)   # 5 of 10 samples
    assert m["top5"] == pytest.approx(100)
    # all confidences ≈ 1 in the top bin: ECE = |0.5 − 1| = 50 %
    assert m["ece"] == pytest.approx(50, abs=1e-3)
    f = torch.arange(10, dtype=torch.float32)
    m = compute_metrics(logits, y, counts, feat_norms=f)
    np.testing.assert_allclose(m["feat_norm_per_class"], [0.5, 3.0, 7.0])


def test_ece_two_bins():
    from ltkernels.train.metrics import ece_from
    conf = torch.tensor([0.9, 0.9, 0.3, 0.3])
    correct = torch.tensor([1, 0, 1, 1])
    # bin 0.9: acc 0.5 → 0.4 gap ×0.5; bin 0.3: acc 1 → 0.7 gap ×0.5
    assert ece_from(conf, correct, 10) == pytest.approx(0.55)


# ------------------------------------------------------------------------------------------ stages, AMP
def test_two_stage_freezes_backbone_and_trains_head(tmp_path):
    ov = ["method=gcl", "optim.epochs=2", "train.max_steps_per_epoch=3", "stage2.optim.epochs=2"]
    two = train(tiny_cfg(tmp_path / "two", *ov), log=lambda *a: None)
    one = train(tiny_cfg(tmp_path / "one", *ov, "stage2=null"), log=lambda *a: None)
    a, b = state_of(tmp_path / "two"), state_of(tmp_path / "one")
    bb = [k for k in a if k.startswith("backbone.")]
    assert any("running_mean" in k for k in bb)
    for k in bb:   # weights and BN running statistics untouched by stage 2 (frozen, eval mode)
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["head.weight"], b["head.weight"])
    assert [s["stage"] for s in two["stages"]] == [1, 2] and two["stages"][1]["loss"] == "gcl"


@pytest.mark.parametrize("head_init", ["reinit", "lws"])
def test_crt_and_lws(tmp_path, head_init):
    s = train(tiny_cfg(tmp_path, f"method={'crt' if head_init == 'reinit' else 'lws'}", "optim.epochs=1",
                       "train.max_steps_per_epoch=2", "stage2.optim.epochs=1"), log=lambda *a: None)
    st = state_of(tmp_path)
    assert ("head.scales" in st) == (head_init == "lws")
    assert math.isfinite(s["test"]["top1"])


def test_mixup_one_shared_noise_draw(tmp_path):
    """mixup_noise=one: both mixup terms see the same cloud (the official code draws twice): the run differs
    from the two-draw run but stays finite."""
    ov = ["method=gcl", "stage2=null", "optim.epochs=1", "train.max_steps_per_epoch=3"]
    train(tiny_cfg(tmp_path / "one", *ov, "train.mixup_noise=one"), log=lambda *a: None)
    train(tiny_cfg(tmp_path / "two", *ov), log=lambda *a: None)
    a, b = state_of(tmp_path / "one"), state_of(tmp_path / "two")
    assert torch.isfinite(a["head.weight"]).all() and not torch.equal(a["head.weight"], b["head.weight"])


def test_amp_bf16_and_grad_clip(tmp_path):
    s = train(tiny_cfg(tmp_path, "method=ldam_drw", "train.amp=bf16", "optim.grad_clip=1.0", "optim.epochs=2",
                       "train.max_steps_per_epoch=3"), log=lambda *a: None)
    assert math.isfinite(s["test"]["top1"])
    assert all(torch.isfinite(v).all() for v in state_of(tmp_path).values() if v.is_floating_point())


def test_tau_norm_posthoc_and_outputs(tmp_path):
    s = train(tiny_cfg(tmp_path, "method=tau_norm", "optim.epochs=2", "train.max_steps_per_epoch=3",
                       "train.figures=true"), log=lambda *a: None)
    assert math.isfinite(s["test"]["top1"])
    for f in ("metrics.csv", "summary.json", "config.yaml", "figures/per_class_acc.png",
              "figures/feature_norm.png"):
        assert os.path.exists(tmp_path / f), f
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and "val_top1" in rows[0] and "val_few" in rows[0]
    # a fresh run (resume off) in the same directory replaces the logs instead of appending
    train(tiny_cfg(tmp_path, "method=tau_norm", "optim.epochs=2", "train.max_steps_per_epoch=3",
                   "train.resume=false"), log=lambda *a: None)
    assert (tmp_path / "metrics.csv").read_text().strip().splitlines() == rows


# ------------------------------------------------------------------------------------------ resume
# The training CLI with a fault injected from outside: the process dies (os._exit, no cleanup, exit code 17)
# right after global step LTK_TEST_CRASH_AT, i.e. after that step's bookkeeping (its checkpoint, if one is due).
CRASHING_CLI = """
import os, sys
from ltkernels.train import engine
from ltkernels.train.__main__ import main
crash_at = int(os.environ["LTK_TEST_CRASH_AT"])
after_step = engine.Trainer.after_step
def crash_after(self, *a, **k):
    after_step(self, *a, **k)
    if self.global_step == crash_at:
        os._exit(17)
engine.Trainer.after_step = crash_after
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def crashing_cli():
    def run(crash_at, *args):
        env = dict(os.environ, OMP_NUM_THREADS="1", LTK_TEST_CRASH_AT=str(crash_at))
        return subprocess.run([sys.executable, "-c", CRASHING_CLI, "--config", DIGITS, *TINY, *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
    return run


RESUME_OV = ["method=gcl", "optim.epochs=3", "train.max_steps_per_epoch=4", "stage2.optim.epochs=2",
             "train.tensorboard=true"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(build_config(DIGITS, TINY + RESUME_OV + [f"output_dir={out}"]), log=lambda *a: None)
    return out


@pytest.mark.parametrize("crash_at,ckpt_every", [(6, 0), (15, 3)], ids=["stage1-epoch-ckpt", "stage2-step-ckpt"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, uninterrupted, crashing_cli, crash_at, ckpt_every):
    """GCL two-stage (mixup, cloud noise, class-balanced stage 2): a process killed mid-epoch (os._exit, no
    cleanup) and resumed from its last atomic checkpoint ends bit-identical to an uninterrupted run."""
    full, cut = uninterrupted, tmp_path / "cut"
    ov = RESUME_OV + [f"train.ckpt_every_steps={ckpt_every}"]
    p = crashing_cli(crash_at, *ov, f"output_dir={cut}")
    assert p.returncode == 17, p.stdout + p.stderr
    assert not os.path.exists(cut / "checkpoint.pt.tmp")
    ck = torch.load(cut / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert not ck["done"] and ck["global_step"] <= crash_at
    assert (ck["step"] > 0) == (ckpt_every > 0)   # a mid-epoch checkpoint when asked for
    train(build_config(DIGITS, TINY + ov + [f"output_dir={cut}", "train.resume=true"]), log=lambda *a: None)
    a, b = state_of(full), state_of(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((full / "summary.json").read_text())["test"]
    sb = json.loads((cut / "summary.json").read_text())["test"]
    assert sa == sb
    assert (full / "metrics.csv").read_text() == (cut / "metrics.csv").read_text()


# ------------------------------------------------------------------------------------------ CLIs
def test_eval_cli_matches_training_summary(tmp_path, capsys):
    from ltkernels.eval import main as eval_main
    s = train(tiny_cfg(tmp_path, "method=ldam_drw", "optim.epochs=2", "train.max_steps_per_epoch=3"),
              log=lambda *a: None)
    rc = eval_main(["--config", DIGITS, "--checkpoint", str(tmp_path / "checkpoint.pt"), "--json",
                    str(tmp_path / "e.json"), "method=ldam_drw", *TINY])
    assert rc == 0
    m = json.loads((tmp_path / "e.json").read_text())
    for k in ("top1", "many", "medium", "few", "ece"):
        assert m[k] == pytest.approx(s["test"][k]), k


def test_compare_cli_prints_group_table(tmp_path, capsys):
    from ltkernels.train.compare import main as cmp_main
    rc = cmp_main(["--methods", "ce,ldam_drw", "--out", str(tmp_path), *TINY, "optim.epochs=1",
                   "train.max_steps_per_epoch=2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| method" in out and "many" in out and "few" in out and "ldam_drw" in out


def test_cli_config_error_exit_code(capsys):
    from ltkernels.train.__main__ import main
    assert main(["--config", DIGITS, "data.sampler=nope"]) == 2
    err = capsys.readouterr().err
    assert "data.sampler" in err and "class_balanced" in err


# ------------------------------------------------------------------------------------------ reference check
needs_fused = pytest.mark.skipif(not fused_available(), reason="ltkernels.losses (fused) not importable")


@needs_fused
@pytest.mark.parametrize("method", ["ldam_drw", "gcl", "fbl", "kps_ga"])
def test_reference_check_reports_no_difference(tmp_path, method):
    s = train(tiny_cfg(tmp_path, f"method={method}", "loss.impl=fused", "train.ref_check_every=1",
                       "optim.epochs=11", "train.max_steps_per_epoch=2", "eval.every=0", "stage2=null",
                       "loss.drw_epoch=5", "loss.ga_epoch=5"), log=lambda *a: None)
    rc = s["stages"][0]["ref_check"]
    assert rc["checks"] == 22
    assert rc["max_loss_diff"] < 1e-4 and rc["max_grad_diff"] < 1e-5


@needs_fused
@pytest.mark.parametrize("method", ["ldam_drw", "gcl", "fbl"])
def test_fused_and_reference_same_trajectory(tmp_path, method):
    """A few steps with identical injected cloud noise: the fused and the eager loss move the parameters alike."""
    ov = [f"method={method}", "optim.epochs=11", "train.max_steps_per_epoch=1", "eval.every=0", "stage2=null",
          "loss.noise=injected", "loss.drw_epoch=5", "data.augment=false"]
    train(tiny_cfg(tmp_path / "f", *ov, "loss.impl=fused"), log=lambda *a: None)
    train(tiny_cfg(tmp_path / "r", *ov, "loss.impl=reference"), log=lambda *a: None)
    a, b = state_of(tmp_path / "f"), state_of(tmp_path / "r")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
