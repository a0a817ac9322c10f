"""Shared test helpers for the fused-kernel tests.

``devices``: the devices the kernel tests run on: always ``"cpu"``, plus ``"cuda"`` when torch sees a
GPU, so the same tests exercise the CUDA kernels on a machine that has one. Use it as
``@pytest.mark.parametrize("device", devices)`` (import it with ``from conftest import devices``) or
through the ``ltk_device`` fixture.

``other_isas`` / ``run_on_other_isas``: the CPU instruction-set builds other than this process's that the
machine can run, and a function evaluated in one subprocess per build (forced with ATEN_CPU_CAPABILITY).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

import pytest
import torch

# The tests import ltkernels from the repository root (in-place build by tools/build.sh).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=devices)
def ltk_device(request):
    """Each kernel test once per available device."""
    return request.param


@pytest.fixture(scope="module")
def instrumented_emu():
    """The emulation library, which must have been built with the memory-access instrumentation (the
    sanitizer and the access model read it)."""
    import emu

    lib = emu.lib()
    if not lib.instrumented:
        pytest.fail("the emulation library was built without the access instrumentation (LTK_EMU_INSTRUMENT=0)")
    return lib


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo), empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def other_isas() -> list[str]:
    """The portable and AVX2 builds of the CPU kernels, less this process's and those the CPU lacks."""
    here = torch.ops.ltkernels.cpu_isa()
    isas = [isa for isa in ("default", "avx2") if isa != here]
    if "avx2" in isas and not {"avx2", "fma"} <= cpu_flags():
        isas.remove("avx2")
    return isas


def run_on_other_isas(module: str, fn: str, local: Callable[[], Any]) -> tuple[Any, dict[str, tuple[str, Any]]]:
    """``module.fn()`` (a test module's function returning JSON-able data) in one subprocess per build of
    ``other_isas()``, all running while ``local()`` runs here. Returns ``(local(), {isa: (the build the
    subprocess reports, its value)})``; a failing subprocess fails the test with its output."""
    test_dir = os.path.dirname(os.path.abspath(__file__))
    code = (f"import json, torch, {module} as T; "
            f"print('RESULT' + json.dumps([torch.ops.ltkernels.cpu_isa(), T.{fn}()]))")
    procs = {}
    for isa in other_isas():
        env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
        env["PYTHONPATH"] = os.pathsep.join([test_dir, _ROOT, env.get("PYTHONPATH", "")])
        procs[isa] = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=_ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
    mine = local()
    results = {}
    for isa, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"[{isa}] " + out[-3000:] + err[-3000:]
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT")][-1]
        reported, value = json.loads(line[len("RESULT"):])
        results[isa] = (reported, value)
    return mine, results
