"""GPU-oriented options of the harness, each through its config key, on the CPU: channels_last,
torch.compile of the backbone, persistent / prefetching DataLoader workers, SyncBatchNorm under DDP and
pinned, asynchronous copies. On the CPU they must train as the plain run does."""
import gc
import os

import pytest
import torch
import torch.nn as nn

from ltkernels.models import LTModel, build_model
from ltkernels.train import build_config, train
from ltkernels.train import engine
from ltkernels.train.engine import apply_model_options, loader_options, to_device

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DIGITS = os.path.join(REPO, "configs", "digits_lt.yaml")
TINY = ["num_threads=1", "model.width=4", "train.tensorboard=false", "train.figures=false", "train.progress=false",
        "data.eval_batch_size=500", "train.resume=false", "loss.impl=reference", "method=ldam_drw",
        "optim.epochs=2", "train.max_steps_per_epoch=3", "data.augment=false"]


def run(tmp_path, name, *ov):
    s = train(build_config(DIGITS, TINY + [f"output_dir={tmp_path / name}"] + list(ov)), log=lambda *a: None)
    st = torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    return s, st


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return run(tmp_path_factory.mktemp("plain"), "p")


def assert_same_training(a, b, **tol):
    (sa, ma), (sb, mb) = a, b
    assert ma.keys() == mb.keys()
    for k in ma:
        torch.testing.assert_close(ma[k].contiguous(), mb[k].contiguous(), msg=k, **tol)
    assert abs(sa["test"]["top1"] - sb["test"]["top1"]) <= 1.0


def test_channels_last(tmp_path, monkeypatch, plain):
    seen = []
    fwd = LTModel.forward

    def spy(self, x, return_features=False):
        conv = next(m for m in self.backbone.modules() if isinstance(m, nn.Conv2d))
        seen.append((x.is_contiguous(memory_format=torch.channels_last),
                     conv.weight.is_contiguous(memory_format=torch.channels_last)))
        return fwd(self, x, return_features)
    monkeypatch.setattr(LTModel, "forward", spy)
    got = run(tmp_path, "cl", "model.channels_last=true")
    assert seen and all(a and b for a, b in seen)   # every batch (training and evaluation) and the weights
    assert_same_training(got, plain, rtol=1e-3, atol=1e-3)   # NHWC kernels sum in another order


def test_compile_backbone_keeps_state_dict_keys(tmp_path, monkeypatch, plain):
    calls = []
    real = torch.compile

    def spy(fn=None, **kw):
        calls.append((getattr(fn, "__self__", None), kw.get("mode"), kw.get("backend")))
        return real(fn, **kw)
    monkeypatch.setattr(torch, "compile", spy)
    # the eager backend traces with dynamo without code generation (inductor's C++ build takes minutes here)
    got = run(tmp_path, "c", "train.compile=true", "train.compile_backend=eager")
    assert len(calls) == 1 and type(calls[0][0]).__name__ == "DigitsCNN" and calls[0][1:] == ("default", "eager")
    assert_same_training(got, plain, rtol=1e-5, atol=1e-6)   # same keys (no _orig_mod.), same numbers


def test_persistent_prefetching_workers(tmp_path, monkeypatch):
    made = []

    class Spy(torch.utils.data.DataLoader):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append((self, kw))
    monkeypatch.setattr(engine, "DataLoader", Spy)
    iterators = []
    get_iter = Spy._get_iterator

    def record(self):
        it = get_iter(self)
        iterators.append((self, it))
        return it
    monkeypatch.setattr(Spy, "_get_iterator", record)
    s, _ = run(tmp_path, "w", "data.num_workers=1", "data.persistent_workers=true", "data.prefetch_factor=3",
               "optim.epochs=3")
    assert s["test"]["top1"] >= 0
    train_loaders = [(l, kw) for l, kw in made if kw.get("sampler") is not None]
    assert len(train_loaders) == 1   # one loader for the stage's three epochs
    loader, kw = train_loaders[0]
    assert kw["persistent_workers"] is True and kw["prefetch_factor"] == 3 and kw["num_workers"] == 1
    # one worker pool for the three epochs: a loader without persistent workers starts one per epoch
    assert sum(l is loader for l, _ in iterators) == 1
    # the evaluation loaders are cached too (val each epoch, test at the end): built once per split
    assert len(made) == 3
    # shut the worker pools down now (held here they would linger to interpreter exit)
    for lo, _ in made:
        lo._iterator = None
    del loader, train_loaders
    made.clear()
    iterators.clear()
    gc.collect()


def test_worker_options_without_workers():
    """A recipe's worker options do not break a run with num_workers=0 (torch rejects them there)."""
    d = build_config(DIGITS, ["data.persistent_workers=true", "data.prefetch_factor=4"])["data"]
    assert loader_options(d, torch.device("cpu")) == {"num_workers": 0, "pin_memory": False}
    assert loader_options({**d, "num_workers": 2}, torch.device("cuda")) == {
        "num_workers": 2, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 4}


def test_sync_bn_under_ddp_only_on_gpus():
    m = {"arch": "digits_cnn", "head": "linear", "width": 4, "sync_bn": True}
    notes = []

    def count(model):
        return sum(isinstance(x, nn.SyncBatchNorm) for x in model.modules())
    one = apply_model_options(build_model(m, 10), m, {}, torch.device("cpu"), 1, notes.append)
    cpu = apply_model_options(build_model(m, 10), m, {}, torch.device("cpu"), 2, notes.append)
    # a non-CPU device without a GPU: the meta device (no data) stands in for cuda
    gpu = apply_model_options(build_model(m, 10), m, {}, torch.device("meta"), 2, notes.append)
    assert count(one) == 0 and count(cpu) == 0 and count(gpu) > 0
    assert len(notes) == 1 and "sync_bn" in notes[0]
    off = apply_model_options(build_model({**m, "sync_bn": False}, 10), {**m, "sync_bn": False}, {},
                              torch.device("meta"), 2, notes.append)
    assert count(off) == 0


@pytest.mark.parametrize("method", ["crt", "lws"])
def test_stage2_head_is_made_on_the_model_device(method):
    """cRT's new head and LWS's scales follow the model to its device (the meta device stands in for a GPU)."""
    from ltkernels.train.config import stage_configs
    from ltkernels.train.engine import prepare_stage, resolve_head
    cfg = build_config(DIGITS, [f"method={method}"])
    model = build_model({**cfg["model"], "head": resolve_head(cfg)}, 10).to("meta")
    prepare_stage(model, stage_configs(cfg)[1], 1, 10)
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_to_device_on_cpu_is_a_plain_move():
    t = torch.arange(5)
    assert to_device(t, torch.device("cpu")) is t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_device_pins_and_copies_asynchronously():
    t = torch.randn(100)
    out = to_device(t, torch.device("cuda"))
    assert out.is_cuda and torch.equal(out.cpu(), t)


def test_large_recipes_turn_the_gpu_options_on():
    for name in ("imagenet_lt_r50", "places_lt_r152", "inat2018_r50"):
        c = build_config(name)
        assert c["model"]["channels_last"] and c["train"]["compile"] and c["train"]["amp"] == "bf16", name
        assert c["data"]["persistent_workers"] and c["data"]["prefetch_factor"] and c["data"]["num_workers"] > 0
    assert build_config("cifar10_lt")["data"]["persistent_workers"]
