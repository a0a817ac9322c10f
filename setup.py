"""Build script for ltkernels and its C++/CUDA extension ``ltkernels._C``.

CPU kernels are always built. CUDA kernels are built when torch is a CUDA build *and* a CUDA toolkit
(nvcc) is found; ``torch.cuda.is_available()`` is deliberately not consulted because build machines
usually have no GPU. Environment switches:

* ``LTK_BUILD_CUDA=0`` forces a CPU-only build, ``LTK_BUILD_CUDA=1`` fails loudly if CUDA can't be built.
* ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0+PTX`` (A100, H100 and forward-compatible PTX).
* ``CUDA_HOME`` defaults to ``/usr/local/cuda`` when that exists (a shim nvcc on PATH misleads torch).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if not home:
        nvcc = shutil.which("nvcc")
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    return None


def _want_cuda(torch) -> bool:
    flag = os.environ.get("LTK_BUILD_CUDA", "auto").lower()
    if flag in ("0", "off", "false", "no"):
        return False
    possible = torch.version.cuda is not None and _cuda_home() is not None
    if flag in ("1", "on", "true", "yes") and not possible:
        sys.exit("LTK_BUILD_CUDA=1 but torch is not a CUDA build or no CUDA toolkit (nvcc) was found")
    return possible


def _extensions():
    import torch
    from torch.utils import cpp_extension

    with_cuda = _want_cuda(torch)
    if with_cuda:
        os.environ["CUDA_HOME"] = _cuda_home()
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    # The instruction-set builds (cpu/isa_avx*.cpp) go last: the linker keeps the first copy of an inline
    # function emitted by several objects, and that copy must be the portable one.
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"), key=lambda s: ("isa_avx" in s, s))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    # -ffp-contract=off: the noise generator must give the same bits on CPU and CUDA, so no implicit
    # fused multiply-adds; kernels use explicit fma where they want one.
    # -fopenmp: at::parallel_for is an OpenMP loop in torch's headers; without the flag it compiles to a
    # serial call. torch ships libgomp.so.1 and loads it first, so the extension shares its runtime.
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
    define_macros = []
    ext_cls = cpp_extension.CppExtension
    extra = {"cxx": cxx}
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # torch's pip wheels ship the CUDA headers here (cuda_runtime, cublas, ...).
        for sp in sys.path:
            inc = os.path.join(sp, "nvidia", "cu13", "include")
            if os.path.isdir(inc):
                include_dirs.append(inc)
                break
        define_macros.append(("LTK_WITH_CUDA", "1"))
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
                         "-Xptxas=-v" if os.environ.get("LTK_PTXAS_VERBOSE") else "-Xptxas=-O3",
                         "-Xcudafe", "--diag_suppress=177"]
        ext_cls = cpp_extension.CUDAExtension
    return [ext_cls("ltkernels._C", sources, include_dirs=include_dirs, define_macros=define_macros,
                    extra_compile_args=extra, extra_link_args=["-fopenmp"])]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="ltkernels",
    version="0.1.0",
    description="Fused, tested CPU/CUDA kernels for long-tailed recognition losses, with a training harness",
    packages=find_packages(include=["ltkernels", "ltkernels.*"]),
    package_data={"ltkernels": ["configs/*.yaml"]},
    entry_points={"console_scripts": ["ltk-train = ltkernels.train.__main__:main",
                                      "ltk-eval = ltkernels.eval:main",
                                      "ltk-compare = ltkernels.train.compare:main"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4,<=2.14.1", "numpy", "pyyaml", "tqdm", "matplotlib", "scikit-learn"],
    extras_require={"test": ["pytest", "pytest-benchmark", "scipy", "expecttest", "hypothesis"]},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
