"""DDP through torchrun with 2 gloo processes on the CPU: the sharded global draw and averaged gradients give
the same training result as one process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ltkernels.train import build_config, train

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DIGITS = os.path.join(REPO, "configs", "digits_lt.yaml")
# no BatchNorm (per-rank statistics would legitimately differ), no augmentation/mixup (per-rank RNG)
OV = ["num_threads=1", "method=ce", "model.width=4", "model.bn=false", "data.augment=false", "data.batch_size=16",
      "data.sampler=class_balanced", "optim.epochs=2", "optim.warmup_epochs=0", "train.max_steps_per_epoch=5",
      "train.tensorboard=false", "train.figures=false", "train.progress=false", "data.eval_batch_size=64"]


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    s1 = train(build_config(DIGITS, OV + [f"output_dir={one}"]), log=lambda *a: None)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "ltkernels.train", "--config", DIGITS, *OV, f"output_dir={two}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s2 = json.loads((two / "summary.json").read_text())
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    a = torch.load(one / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(two / "checkpoint.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # the sharded evaluation gathers every test sample once
    assert s2["test"]["per_class_acc"] == pytest.approx(s1["test"]["per_class_acc"], abs=1e-9)
    assert s2["test"]["top1"] == pytest.approx(s1["test"]["top1"])
    # and the model really moved (not a vacuous comparison)
    init = build_config(DIGITS, OV + [f"output_dir={tmp_path / 'z'}", "optim.lr=0.0"])
    s0 = train(init, log=lambda *a: None)
    c = torch.load(tmp_path / "z" / "checkpoint.pt", weights_only=False)["model"]
    assert not torch.allclose(a["head.weight"], c["head.weight"])
