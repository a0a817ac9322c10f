"""Builds and loads the SIMT emulation test library (python_tests/emu/*.cpp -> libltk_emu_<hash>.so).

The library compiles the CUDA kernel sources (csrc/cuda/*.cuh, python_tests/emu/toy_kernels.cuh) with g++
and ``-DLTK_EMULATE`` through the emulator in csrc/emu, and exposes ``extern "C"`` raw-pointer entry points
that tests call through ctypes. No torch headers beyond c10's scalar types are compiled, so a rebuild of
one translation unit takes seconds, and nothing here needs a GPU or the CUDA toolkit.

Sanitizer: every translation unit with device code is compiled with GCC's ThreadSanitizer instrumentation
(``-fsanitize=thread``, no TSan runtime: csrc/emu/sanitizer_impl.h provides the hooks, in sanitizer.cpp,
which is compiled without it), so every global and shared memory access of an emulated kernel is checked
for races, out-of-bounds addresses and uninitialised reads, and can feed the memory-access model
(emu/model.py). ``LTK_EMU_INSTRUMENT=0`` builds a library without it (the checks then do nothing).

Caching: every object is keyed by a hash of the compiler, the flags, its source and the current contents
of every project header it included last time (from the ``-MD`` depfile); the shared library is keyed by
the hash of its objects. An unchanged tree loads the cached library without running the compiler.
Builds take a file lock, so concurrent pytest sessions share one build directory safely.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
BUILD = os.environ.get("LTK_EMU_BUILD_DIR", os.path.join(HERE, "build"))
CXX = os.environ.get("CXX", "g++")
JOBS = max(1, int(os.environ.get("LTK_EMU_JOBS", "2")))

_TORCH_INC = os.path.join(os.path.dirname(torch.__file__), "include")
# Mutation testing (emu/mutants.py): a directory searched before csrc/ whose files shadow project headers,
# and the subset of python_tests/emu/*.cpp to build.
EXTRA_INCLUDE = os.environ.get("LTK_EMU_EXTRA_INCLUDE")
ONLY_SOURCES = [s for s in os.environ.get("LTK_EMU_SOURCES", "").split(",") if s]
INSTRUMENT = os.environ.get("LTK_EMU_INSTRUMENT", "1") != "0"
CXXFLAGS = ([f"-I{EXTRA_INCLUDE}"] if EXTRA_INCLUDE else []) + [
    # -g1: line tables, so that the sanitizer names source lines (addr2line on the library); DWARF 4
    # because binutils 2.40 misreads the file table of GCC 12's DWARF 5 for a .cpp that includes a .cpp
    "-std=c++20", "-O1", "-g1", "-gdwarf-4", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing",
    "-Wall", "-Wno-unknown-pragmas", "-Werror=return-type",
    # probe every stack page, so that an overflowing emulated thread hits its guard page
    "-fstack-clash-protection",
    "-DLTK_EMULATE", "-D__assert_fail=ltk_emu_assert_fail",
    "-I" + os.path.join(ROOT, "csrc", "emu", "stub"),
    "-I" + os.path.join(ROOT, "csrc", "include"),
    "-I" + os.path.join(ROOT, "csrc"),
    "-I" + _TORCH_INC,
]
# Device-code translation units: every memory access calls __tsan_readN / __tsan_writeN (sanitizer_impl.h).
# Function entry/exit hooks are not needed. The translation units below are host-only or the hooks.
INSTRUMENT_FLAGS = ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0", "-DLTK_EMU_INSTRUMENTED"] \
    if INSTRUMENT else []
UNINSTRUMENTED = {"sanitizer.cpp", "api.cpp"}
LDFLAGS = ["-shared", "-Wl,--no-undefined", "-ldl", "-lpthread"]


def _flags(src: str) -> list[str]:
    name = os.path.basename(src)
    if name in UNINSTRUMENTED:
        return CXXFLAGS + (["-DLTK_EMU_INSTRUMENTED"] if INSTRUMENT else [])
    return CXXFLAGS + INSTRUMENT_FLAGS


class EmulatorError(RuntimeError):
    """A kernel misbehaved under the SIMT emulator (message from ltk::emu::Error)."""


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b"<missing>"


_compiler_id: str | None = None


def _compiler() -> str:
    global _compiler_id
    if _compiler_id is None:
        out = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
        _compiler_id = out.splitlines()[0] if out else CXX
    return _compiler_id


def sources() -> list[str]:
    names = ONLY_SOURCES or [f for f in os.listdir(HERE) if f.endswith(".cpp")]
    names = set(names) | {"sanitizer.cpp"}  # the hooks every instrumented library needs
    return sorted(os.path.join(HERE, f) for f in names)


def _project_deps(depfile: str) -> list[str]:
    """Project files (under ROOT, outside the venv) listed in a make-style depfile."""
    text = _read(depfile).decode(errors="replace").replace("\\\n", " ")
    if ":" not in text:
        return []
    deps = text.split(":", 1)[1].split()
    venv = os.path.join(ROOT, ".venv")
    out = []
    for d in deps:
        d = os.path.abspath(d)
        if d.startswith(ROOT + os.sep) and not d.startswith(venv):
            out.append(d)
    return sorted(set(out))


def _obj_key(src: str, obj_dir: str) -> str | None:
    """Key of the cached object for src, or None when no valid cache entry exists."""
    stem = os.path.splitext(os.path.basename(src))[0]
    dep = os.path.join(obj_dir, stem + ".d")
    if not os.path.exists(dep):
        return None
    deps = _project_deps(dep)
    return _sha(_compiler(), " ".join(_flags(src)), torch.__version__, src, _read(src),
                *[d + "\n" + _sha(_read(d)) for d in deps])


def _compile(src: str, obj_dir: str) -> tuple[str, str, float]:
    stem = os.path.splitext(os.path.basename(src))[0]
    obj = os.path.join(obj_dir, stem + ".o")
    keyf = os.path.join(obj_dir, stem + ".key")
    key = _obj_key(src, obj_dir)
    if key and os.path.exists(obj) and _read(keyf).decode() == key:
        return obj, key, 0.0
    t0 = time.time()
    dep = os.path.join(obj_dir, stem + ".d")
    cmd = [CXX, *_flags(src), "-MD", "-MF", dep, "-c", src, "-o", obj + ".tmp"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"emulation build failed for {os.path.relpath(src, ROOT)}:\n{' '.join(cmd)}\n"
                           f"{p.stderr[-20000:]}")
    os.replace(obj + ".tmp", obj)
    key = _obj_key(src, obj_dir)
    with open(keyf, "w") as f:
        f.write(key)
    return obj, key, time.time() - t0


def _static_shared_symbols(so: str) -> list[tuple[str, int, int]]:
    """(demangled name, TLS offset, size) of every thread-local symbol in so: static __shared__
    variables and ltk::emu::detail::g_tls_marker (the reference point)."""
    out = subprocess.run(["readelf", "-sW", "-C", so], capture_output=True, text=True, check=True).stdout
    syms = []
    for line in out.splitlines():
        parts = line.split(None, 7)
        if len(parts) < 8 or parts[3] != "TLS" or parts[6] == "UND":
            continue
        syms.append((parts[7], int(parts[1], 16), int(parts[2], 0)))
    return syms


def build(verbose: bool = False) -> str:
    """Builds (or finds) the library; returns its path."""
    obj_dir = os.path.join(BUILD, "obj")
    os.makedirs(obj_dir, exist_ok=True)
    with open(os.path.join(BUILD, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.time()
        srcs = sources()
        with ThreadPoolExecutor(JOBS) as ex:
            results = list(ex.map(lambda s: _compile(s, obj_dir), srcs))
        key = _sha(*[k for _, k, _ in results], " ".join(LDFLAGS))
        so = os.path.join(BUILD, f"libltk_emu_{key}.so")
        if not os.path.exists(so):
            torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
            cmd = [CXX, *[o for o, _, _ in results], "-o", so + ".tmp", *LDFLAGS,
                   "-L" + torch_lib, "-lc10", "-Wl,-rpath," + torch_lib]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"emulation link failed:\n{' '.join(cmd)}\n{p.stderr[-20000:]}")
            os.replace(so + ".tmp", so)
            # keep the directory small: drop libraries of older trees
            for f in os.listdir(BUILD):
                if f.startswith("libltk_emu_") and f.endswith(".so") and os.path.join(BUILD, f) != so:
                    try:
                        os.remove(os.path.join(BUILD, f))
                    except OSError:
                        pass
        if verbose:
            built = [(os.path.basename(s), round(t, 1)) for s, (_, _, t) in zip(srcs, results) if t]
            print(f"ltk emu library {os.path.basename(so)}: {time.time() - t0:.1f}s, compiled {built}",
                  file=sys.stderr)
        return so


class _Lib:
    def __init__(self, path: str):
        self.path = path
        self.cdll = ctypes.CDLL(path)
        self.cdll.ltk_emu_last_error.restype = ctypes.c_char_p
        self.cdll.ltk_emu_guarded_alloc.restype = ctypes.c_void_p
        self.cdll.ltk_emu_guarded_alloc.argtypes = [ctypes.c_longlong, ctypes.c_longlong]
        self.cdll.ltk_emu_guarded_free.argtypes = [ctypes.c_void_p]
        self.cdll.ltk_emu_set_options.argtypes = [ctypes.c_longlong, ctypes.c_int, ctypes.c_double, ctypes.c_int,
                                                  ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.cdll.ltk_emu_launch_count.restype = ctypes.c_longlong
        self.cdll.ltk_emu_launch_checked.restype = ctypes.c_longlong
        self.cdll.ltk_emu_buffer_register.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int,
                                                      ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        self.cdll.ltk_emu_buffer_unregister.argtypes = [ctypes.c_void_p]
        self.cdll.ltk_emu_buffer_count.restype = ctypes.c_longlong
        self.cdll.ltk_emu_model_json.restype = ctypes.c_char_p
        self.cdll.ltk_emu_register_static_shared_named.argtypes = [ctypes.c_longlong, ctypes.c_longlong,
                                                                   ctypes.c_char_p]
        self.instrumented = bool(self.cdll.ltk_emu_sanitizer_instrumented())
        self.static_shared = []
        syms = _static_shared_symbols(path)
        marker = [off for name, off, _ in syms if name.endswith("g_tls_marker")]
        if marker:
            for name, off, size in syms:
                if name.endswith("g_tls_marker") or name.startswith("guard variable") or size == 0:
                    continue
                if name.startswith(("std::", "c10::", "ltk::emu::", "ltk_emu_test::", "__gnu")):
                    continue
                self.static_shared.append((name, size))
                self.check(self.cdll.ltk_emu_register_static_shared_named(off - marker[0], size,
                                                                          _short_symbol(name).encode()))

    def __getattr__(self, name):
        return getattr(self.cdll, name)

    def check(self, rc: int) -> None:
        if rc != 0:
            raise EmulatorError(self.cdll.ltk_emu_last_error().decode(errors="replace"))

    def ctl(self, fn: str, *args) -> None:
        """Calls an emulator-control entry point (options, launch log): keeps the registered buffers."""
        self.check(getattr(self.cdll, fn)(*args))

    def call(self, fn: str, *args) -> None:
        """Calls an entry point (returning 0/1); raises EmulatorError with the emulator's message. The plain
        tensors registered by ptr() for this call are forgotten afterwards (their memory may be reused)."""
        try:
            self.check(getattr(self.cdll, fn)(*args))
        finally:
            self.cdll.ltk_emu_buffer_clear_transient()


def _short_symbol(name: str) -> str:
    """``toy::block_sum<float, 256>(float)::partial`` -> ``block_sum<float, 256>::partial`` for messages."""
    name = re.sub(r"\((?:[^()]|\([^()]*\))*\)", "", name)  # argument lists
    parts, depth, cur = [], 0, ""
    i = 0
    while i < len(name):  # split at the "::" outside template brackets
        if name[i] == "<":
            depth += 1
        elif name[i] == ">":
            depth -= 1
        elif name.startswith("::", i) and depth == 0:
            parts.append(cur)
            cur, i = "", i + 2
            continue
        cur += name[i]
        i += 1
    parts.append(cur)
    return "::".join(parts[-2:])


_lib: _Lib | None = None


def lib() -> _Lib:
    global _lib
    if _lib is None:
        _lib = _Lib(build(verbose=bool(os.environ.get("LTK_EMU_VERBOSE"))))
    return _lib


# ---- helpers for tests --------------------------------------------------------------------------------
def ptr(t: torch.Tensor | None, *, init: bool = True, name: str | None = None) -> ctypes.c_void_p:
    """The address of a CPU tensor for an entry point. The tensor's bytes are registered with the sanitizer
    as a global buffer for the next L.call (memcheck knows its bounds; a guarded tensor is known already).
    init=False: its content counts as unwritten (initcheck: like torch.empty on a GPU)."""
    if t is None:
        return ctypes.c_void_p(0)
    assert t.device.type == "cpu"
    assert t.is_contiguous(), "the emulated kernels take dense row-major buffers"
    nbytes = t.numel() * t.element_size()
    if nbytes:
        lib().cdll.ltk_emu_buffer_register(t.data_ptr(), nbytes, int(init), (name or "").encode(), 0, 1)
    return ctypes.c_void_p(t.data_ptr())


def set_options(seed: int | None = None, schedule: str | None = None, timeout_s: float | None = None,
                sm_count: int | None = None, poison: bool | None = None, shuffle_blocks: bool | None = None,
                stack_kb: int | None = None, clamp_grid: int | None = None, sanitize: bool | None = None,
                model: bool | None = None) -> None:
    """clamp_grid: run at most this many blocks along x and y (grid-stride kernels only; 0 = off).
    sanitize: racecheck / memcheck / initcheck of every access (default on); model: record the
    memory-access model of every launch (emu.model_launches())."""
    if clamp_grid is not None:
        lib().ctl("ltk_emu_set_clamp_grid", int(clamp_grid))
    if sanitize is not None or model is not None:
        lib().cdll.ltk_emu_set_sanitize(-1 if sanitize is None else int(sanitize), -1 if model is None else int(model))
    sched = {None: -1, "random": 0, "forward": 1, "reverse": 2, "uniform": 3, "warps": 4}[schedule]
    lib().ctl("ltk_emu_set_options", -1 if seed is None else seed, sched,
               -1.0 if timeout_s is None else float(timeout_s), sm_count or 0,
               -1 if poison is None else int(poison), -1 if shuffle_blocks is None else int(shuffle_blocks),
               stack_kb or 0)


def get_options() -> dict:
    seed, sched, timeout, sms = ctypes.c_longlong(), ctypes.c_int(), ctypes.c_double(), ctypes.c_int()
    lib().ctl("ltk_emu_get_options", ctypes.byref(seed), ctypes.byref(sched), ctypes.byref(timeout),
               ctypes.byref(sms))
    san = lib().cdll.ltk_emu_get_sanitize()
    return {"seed": seed.value, "schedule": ["random", "forward", "reverse", "uniform", "warps"][sched.value],
            "timeout_s": timeout.value, "sm_count": sms.value, "clamp_grid": lib().ltk_emu_get_clamp_grid(),
            "sanitize": bool(san & 1), "model": bool(san & 2)}


class options:
    """Context manager: emulator options for a block of code, restored afterwards."""

    def __init__(self, **kw):
        self.kw = kw

    def __enter__(self):
        self.saved = get_options()
        set_options(**self.kw)
        return self

    def __exit__(self, *exc):
        set_options(**self.saved)
        if "poison" in self.kw:
            set_options(poison=True)
        if "shuffle_blocks" in self.kw:
            set_options(shuffle_blocks=True)
        return False


def launches() -> list[dict]:
    """The launch log: kernel name, grid, block, dynamic shared memory, context switches, failed, and the
    number of global / shared accesses the sanitizer checked ("checked")."""
    L = lib()
    n = L.ltk_emu_launch_count()
    out = []
    for i in range(n):
        g, b = (ctypes.c_uint * 3)(), (ctypes.c_uint * 3)()
        smem, sw, failed = ctypes.c_longlong(), ctypes.c_longlong(), ctypes.c_int()
        name = ctypes.create_string_buffer(512)
        L.ctl("ltk_emu_launch_info", ctypes.c_longlong(i), g, b, ctypes.byref(smem), ctypes.byref(sw),
               ctypes.byref(failed), name, 512)
        out.append({"kernel": name.value.decode(), "grid": tuple(g), "block": tuple(b), "smem": smem.value,
                    "switches": sw.value, "failed": bool(failed.value),
                    "checked": L.cdll.ltk_emu_launch_checked(ctypes.c_longlong(i))})
    return out


def clear_launches() -> None:
    lib().ltk_emu_clear_launch_log()


class _GuardedOwner:
    def __init__(self, address: int):
        self.address = address

    def __del__(self):
        if _lib is not None and self.address:
            _lib.cdll.ltk_emu_buffer_unregister(ctypes.c_void_p(self.address))
            _lib.cdll.ltk_emu_guarded_free(ctypes.c_void_p(self.address))


def guarded(t: torch.Tensor, *, init: bool | None = None, name: str | None = None) -> torch.Tensor:
    """A copy of the CPU tensor t in memory whose last byte is followed by an inaccessible page (and whose
    front slack is 0xFF-filled): a kernel that reads or writes past the end fails with EmulatorError.

    The buffer is registered with the sanitizer (memcheck, racecheck, the model's region ``name``).
    init: whether its content counts as written (initcheck). None (default): an all-NaN floating tensor
    is an output buffer whose content counts as unwritten (the tests pre-fill outputs with NaN), anything
    else is initialised input data. init=False: unwritten whatever the content (torch.empty on a GPU)."""
    t = t.contiguous()
    if init is None:
        init = not (t.is_floating_point() and t.numel() > 0 and bool(torch.isnan(t).all()))
    nbytes = t.numel() * t.element_size()
    addr = lib().ltk_emu_guarded_alloc(max(nbytes, 1), t.element_size())
    if not addr:
        raise EmulatorError(lib().ltk_emu_last_error().decode())
    owner = _GuardedOwner(addr)
    buf = (ctypes.c_char * max(nbytes, 1)).from_address(addr)
    buf._ltk_owner = owner  # freed when the last tensor view of the buffer dies
    out = torch.frombuffer(buf, dtype=t.dtype, count=t.numel()).view(t.shape) if t.numel() else t.clone()
    if t.numel():
        out.copy_(t)
    lib().cdll.ltk_emu_buffer_register(addr, max(nbytes, 1), int(init), (name or "").encode(), 1, 0)
    return out


def instrumented() -> bool:
    """Whether the library's device code reports its memory accesses (the sanitizer and the model work)."""
    return lib().instrumented


def model_launches(clear: bool = True) -> list[dict]:
    """The memory-access model of every launch since the last call (emu.options(model=True) records it):
    per launch the kernel, grid, block, per-region totals (sectors read / written, bytes used) and per
    instruction ("site") the warp-level requests, active lanes, bytes used, 32-byte sectors, access width
    and shared-memory wavefronts. python_tests/emu/model.py turns them into the report's figures."""
    import json

    out = json.loads(lib().cdll.ltk_emu_model_json().decode())
    if clear:
        lib().cdll.ltk_emu_model_clear()
    return out
