"""pytest plugin: keep only the tests that run on a CUDA device (tools/gpu_check.sh's test step).

Load it with ``-p pytest_cuda_only`` (tools/ on PYTHONPATH). A collected test is kept when

* one of its parameters is a CUDA device (``"cuda"``, ``"cuda:N"`` or a ``torch.device`` of type cuda): the
  ``devices`` list of python_tests/conftest.py (and its ``ltk_device`` fixture) and the modules' own
  ``DEVICES`` lists add that parameter when torch sees a GPU; or
* it exists only for a GPU: the ``cuda`` marker, or a ``skipif`` whose reason says it needs a CUDA device or
  a GPU (conftest's ``requires_cuda`` and the modules' ``skipif(not torch.cuda.is_available(), ...)``).

Everything else is deselected: the CPU parametrizations, and the tests that only need the CUDA toolkit
(the nvcc compile and SASS gates, the emulator's kernel inventories), which run on any machine with nvcc.
Names are not matched: ``-k cuda`` would pick those toolkit-only tests and miss GPU tests whose names do
not mention CUDA.
"""
from __future__ import annotations

import re
from typing import Any

import pytest

_GPU_REASON = re.compile(r"\b(cuda device|gpu)\b", re.IGNORECASE)


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return getattr(value, "type", None) == "cuda" and type(value).__name__ == "device"


def runs_on_cuda(item: pytest.Item) -> bool:
    """Whether ``item`` runs on a CUDA device when one is available (see the module doc)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(_is_cuda_device(v) for v in callspec.params.values()):
        return True
    if item.get_closest_marker("cuda") is not None:
        return True
    for mark in item.iter_markers("skipif"):
        if _GPU_REASON.search(str(mark.kwargs.get("reason", ""))):
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep = [it for it in items if runs_on_cuda(it)]
    drop = [it for it in items if not runs_on_cuda(it)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> str:
    return f"pytest_cuda_only: {len(items)} tests that run on CUDA selected"
