"""pytest configuration shared by the benchmark suites in bench/ (``bench_*.py``).

Options (each also settable by an environment variable, the option wins):

  --bench-sizes   LTK_BENCH_SIZES    ``std`` (default: 128x100,256x1000,512x8142), ``smoke`` (tiny
                                      shapes for correctness runs), or an explicit list ``64x50,128x100``
  --bench-dtypes  LTK_BENCH_DTYPES   ``fp32,bf16`` (default)
  --bench-compile / --bench-no-compile
                  LTK_BENCH_COMPILE  ``1``/``0``: include the torch.compile(reference) cases (default on)
  --bench-compile-backend
                  LTK_BENCH_COMPILE_BACKEND  ``inductor`` (default); ``eager`` only exercises the harness
  --bench-cases   LTK_BENCH_CASES    comma list of cases (bench_losses: CE,LDAM,KPS,...; default all)
  --bench-interleave-time LTK_BENCH_INTERLEAVE_TIME  seconds per case for ratios measured in
                                      alternating rounds (suites that use it; default 0.3, 0 = off)
  --bench-threads LTK_BENCH_THREADS  torch.set_num_threads for the run (default: torch's default)

Files named ``bench_*.py`` under bench/ are collected as test modules (pyproject's ``python_files``
only lists ``test_*.py``), so ``python -m pytest bench`` runs every suite, including suites written by
others. Convention for a suite that wants its results in bench/results/results.md: set
``benchmark.group`` and ``benchmark.extra_info`` with the keys ``suite``, ``case``, ``shape`` (``"NxC"``),
``dtype``, ``mode`` (``"fwd"`` / ``"fwd+bwd"``), ``impl`` and optionally ``peak_mem_bytes`` (the
``record_case`` fixture does that); see bench/README.md.

Peak memory method (the ``peak_memory`` fixture): one call of the step under
``torch.profiler.profile(profile_memory=True)``; the profiler records every allocation and free of
torch's CPU allocator (c10) with its size and timestamp; the peak of the running sum (allocated minus
freed since the profile started) is the *peak extra memory* of the step: everything the step
allocates above what was live before it (inputs and module buffers are excluded, the returned
``x.grad`` is included). It is deterministic (no RSS / page-cache noise) but ignores memory that
does not come from torch's allocator (none of the code measured here allocates outside it).
"""
from __future__ import annotations

import fnmatch
import os
import time
from types import SimpleNamespace

import pytest

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's start/stop chatter on stderr

STD_SIZES = [(128, 100), (256, 1000), (512, 8142)]
SMOKE_SIZES = [(7, 37)]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp64": "float64", "fp16": "float16"}


def parse_sizes(text: str) -> list[tuple[int, int]]:
    text = (text or "std").strip().lower()
    if text in ("std", "standard", "full", "default"):
        return list(STD_SIZES)
    if text in ("smoke", "tiny"):
        return list(SMOKE_SIZES)
    out = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            n, c = part.split("x")
            out.append((int(n), int(c)))
        except ValueError:
            raise pytest.UsageError(f"--bench-sizes: cannot parse {part!r} (want NxC, e.g. 512x8142)") from None
    if not out:
        raise pytest.UsageError("--bench-sizes: no sizes given")
    return out


def parse_dtypes(text: str) -> list[str]:
    names = [p.strip().lower() for p in (text or "fp32,bf16").split(",") if p.strip()]
    for n in names:
        if n not in DTYPES:
            raise pytest.UsageError(f"--bench-dtypes: unknown dtype {n!r} (known: {', '.join(DTYPES)})")
    return names


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    return v.strip().lower() not in ("0", "false", "no", "off")


def pytest_addoption(parser):
    g = parser.getgroup("ltkernels-bench")
    g.addoption("--bench-sizes", default=None, help="std | smoke | NxC,NxC,... (env LTK_BENCH_SIZES)")
    g.addoption("--bench-dtypes", default=None, help="comma list of fp32,bf16,fp64,fp16 (env LTK_BENCH_DTYPES)")
    g.addoption("--bench-compile", dest="bench_compile", action="store_true", default=None,
                help="include torch.compile(reference) cases (default; env LTK_BENCH_COMPILE=1)")
    g.addoption("--bench-no-compile", dest="bench_compile", action="store_false",
                help="skip torch.compile(reference) cases (env LTK_BENCH_COMPILE=0)")
    g.addoption("--bench-cases", default=None,
                help="comma list of cases for suites that have named cases (bench_losses: CE,LDAM,...; "
                     "env LTK_BENCH_CASES; default all)")
    g.addoption("--bench-interleave-time", type=float, default=None,
                help="seconds per case for the interleaved fused-vs-other ratio (default 0.3, 0 = off; "
                     "env LTK_BENCH_INTERLEAVE_TIME)")
    g.addoption("--bench-threads", type=int, default=None,
                help="torch.set_num_threads for the run (default: torch's default; env LTK_BENCH_THREADS)")
    g.addoption("--bench-compile-backend", default=None,
                help="torch.compile backend for the compiled cases (default inductor; env LTK_BENCH_COMPILE_BACKEND)")


def pytest_configure(config):
    sizes = config.getoption("--bench-sizes", default=None) or os.environ.get("LTK_BENCH_SIZES", "std")
    dtypes = config.getoption("--bench-dtypes", default=None) or os.environ.get("LTK_BENCH_DTYPES", "fp32,bf16")
    comp = config.getoption("bench_compile", default=None)
    if comp is None:
        comp = _env_flag("LTK_BENCH_COMPILE", True)
    backend = (config.getoption("--bench-compile-backend", default=None)
               or os.environ.get("LTK_BENCH_COMPILE_BACKEND", "inductor"))
    inter = config.getoption("--bench-interleave-time", default=None)
    if inter is None:
        inter = float(os.environ.get("LTK_BENCH_INTERLEAVE_TIME", "0.3"))
    threads = config.getoption("--bench-threads", default=None) or int(os.environ.get("LTK_BENCH_THREADS", "0"))
    if threads:
        import torch

        torch.set_num_threads(threads)
    cases = config.getoption("--bench-cases", default=None) or os.environ.get("LTK_BENCH_CASES", "")
    cases = [c.strip() for c in cases.split(",") if c.strip()] or None
    config.ltk_bench = SimpleNamespace(sizes=parse_sizes(sizes), dtypes=parse_dtypes(dtypes), cases=cases,
                                       compile=bool(comp), compile_backend=backend, interleave_time=inter,
                                       threads=threads or None, t0=time.time(), loadavg_start=_loadavg())


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine_summary() -> dict:
    """CPU model, cores, torch version/threads and the ISA of ltkernels' CPU kernels."""
    import platform

    import torch

    try:
        import ltkernels._ops  # noqa: F401  (registers torch.ops.ltkernels.*)

        isa = str(torch.ops.ltkernels.cpu_isa())
    except Exception as exc:  # pragma: no cover - extension not built
        isa = f"unavailable ({type(exc).__name__})"
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_isa": isa, "python": platform.python_version()}


def pytest_benchmark_update_machine_info(config, machine_info):
    info = machine_summary()
    ns = getattr(config, "ltk_bench", None)
    if ns is not None:
        info.update(loadavg_start=ns.loadavg_start, loadavg_end=_loadavg(), wall_s=time.time() - ns.t0,
                    sizes=[f"{n}x{c}" for n, c in ns.sizes], dtypes=ns.dtypes, compile=ns.compile,
                    compile_backend=ns.compile_backend, interleave_time=ns.interleave_time)
    machine_info["ltkernels"] = info


def pytest_collect_file(file_path, parent):
    """Collect bench/bench_*.py as test modules (unless python_files already matches them)."""
    name = file_path.name
    if file_path.suffix != ".py" or not name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):  # named on the command line: pytest collects it already
        return None
    if any(fnmatch.fnmatch(name, pat) for pat in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_report_header(config):
    ns = getattr(config, "ltk_bench", None)
    if ns is None:
        return None
    sizes = ",".join(f"{n}x{c}" for n, c in ns.sizes)
    return (f"ltkernels bench: sizes={sizes} dtypes={','.join(ns.dtypes)} "
            f"compile={'on (' + ns.compile_backend + ')' if ns.compile else 'off'} "
            f"interleave={ns.interleave_time}s threads={ns.threads or 'default'}")


# ----------------------------------------------------------------------------------------------
# Helpers as fixtures (usable by every suite in bench/)
# ----------------------------------------------------------------------------------------------

def measure_peak_memory(fn) -> int:
    """Peak extra bytes allocated by torch's CPU allocator during one call of ``fn`` (see module doc)."""
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if e.device_type() != DeviceType.CPU:  # host memory only
            continue
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


@pytest.fixture
def peak_memory():
    """``peak_memory(fn) -> int``: peak extra bytes of one call (torch.profiler allocation events)."""
    return measure_peak_memory


@pytest.fixture
def bench_options(request):
    """The parsed bench options: ``.sizes``, ``.dtypes``, ``.compile``, ``.compile_backend``."""
    return request.config.ltk_bench


class CpuMeter:
    """CPU time used by *other* processes since creation, in cores (0 = the machine was ours).

    (all cores' busy time from /proc/stat - this process's own CPU time from /proc/self/stat) / wall
    time. Resolution: one clock tick (10 ms) over the measured window. Returns None off Linux."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.busy0, self.self0 = _busy_ticks(), _self_ticks()

    def others(self):
        busy, me = _busy_ticks(), _self_ticks()
        dt = time.monotonic() - self.t0
        if None in (busy, me, self.busy0, self.self0) or dt <= 0:
            return None
        return max(0.0, ((busy - self.busy0) - (me - self.self0)) / _CLK_TCK / dt)


try:
    _CLK_TCK = os.sysconf("SC_CLK_TCK")
except (ValueError, OSError, AttributeError):  # pragma: no cover
    _CLK_TCK = 100


def _busy_ticks():
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(vals) - vals[3] - vals[4]  # minus idle and iowait


def _self_ticks():
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime of all threads


@pytest.fixture
def record_case(benchmark):
    """``record_case(suite=, case=, shape=(N, C), dtype=, mode=, impl=, **extra)``: name the
    benchmark group and fill ``extra_info`` the way bench/report.py expects. Call it after the
    warm-up (compiles), right before the timed part: from then until the test ends, the CPU used by
    other processes is measured and stored as ``extra_info["other_load"]`` (cores; see CpuMeter),
    which the report uses to flag (and ``--rerun-noisy`` to repeat) cases measured under load."""

    def record(*, suite: str, case: str, shape, dtype: str, mode: str, impl: str, **extra):
        shape_s = shape if isinstance(shape, str) else "x".join(str(int(s)) for s in shape)
        benchmark.group = f"{suite}: {case} {shape_s} {dtype} {mode}"
        benchmark.extra_info.update(suite=suite, case=case, shape=shape_s, dtype=dtype, mode=mode, impl=impl)
        benchmark.extra_info.update(extra)
        benchmark._ltk_meter = CpuMeter()

    yield record
    meter = getattr(benchmark, "_ltk_meter", None)
    if meter is not None and not benchmark.disabled:
        load = meter.others()
        benchmark.extra_info["other_load"] = None if load is None else round(load, 3)
