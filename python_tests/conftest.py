"""Shared test helpers for the fused-kernel tests.

``devices``: the devices the kernel tests run on: always ``"cpu"``, plus ``"cuda"`` when torch sees a
GPU, so the same tests exercise the CUDA kernels on a machine that has one. Use it as
``@pytest.mark.parametrize("device", devices)`` (import it with ``from conftest import devices``) or
through the ``ltk_device`` fixture.
"""
from __future__ import annotations

import os
import sys

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
