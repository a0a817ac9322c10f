"""The package as a user installs it: a wheel built from the repository's files (CPU-only extension), installed
into a fresh virtual environment, runs the packaged digits recipe through the console scripts from an empty
directory, importing the installed ltkernels (not this checkout)."""
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _source_files():
    """The files a clone has: tracked ones plus new ones git does not ignore (no build outputs, no venv)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and os.path.lexists(os.path.join(REPO, f))]


def _copy_tree(dst):
    for f in _source_files():
        s, d = os.path.join(REPO, f), os.path.join(dst, f)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        if os.path.islink(s):
            os.symlink(os.readlink(s), d)
        else:
            shutil.copy2(s, d)


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _run(cmd, cwd, env, timeout=900):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout


@pytest.mark.slow
def test_wheel_installs_and_trains_from_an_empty_directory(tmp_path):
    if not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("needs the git checkout (the wheel is built from its tracked files)")
    src, wheels, venv, work = (tmp_path / n for n in ("src", "wheels", "venv", "work"))
    # a copy, so that the build never touches the checkout's in-place extension or its build/ folder
    _copy_tree(str(src))
    env = _clean_env(LTK_BUILD_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(wheels), str(src)],
         str(tmp_path), env)
    (whl,) = [str(wheels / f) for f in os.listdir(wheels) if f.endswith(".whl")]
    names = zipfile.ZipFile(whl).namelist()
    assert "ltkernels/configs/digits_lt.yaml" in names and "ltkernels/configs/_large.yaml" in names
    assert any(n.startswith("ltkernels/_C") and n.endswith(".so") for n in names)
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "ltk-train" in zipfile.ZipFile(whl).read(entry[0]).decode()

    # a fresh venv that sees this interpreter's packages (torch is not installed a second time) through a
    # .pth line: that makes them importable without running their .pth hooks (the checkout's editable finder)
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], str(tmp_path), env)
    py = str(venv / "bin" / "python")
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], str(tmp_path), env)
    with open(os.path.join(purelib.strip(), "_parent_site.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", whl], str(tmp_path), env)

    work.mkdir()
    bin_ = venv / "bin"
    where = _run([py, "-c", "import torch, ltkernels, ltkernels._C; print(ltkernels.__file__, ltkernels._C.__file__)"],
                 str(work), env).split()
    assert len(where) == 2 and all(w.startswith(str(venv)) for w in where), where
    assert "digits_lt" in _run([str(bin_ / "ltk-train"), "--list-configs"], str(work), env).split()

    tiny = ["optim.epochs=2", "train.max_steps_per_epoch=3", "stage2.optim.epochs=1", "model.width=4",
            "train.figures=false", "train.tensorboard=false"]
    out = _run([str(bin_ / "ltk-train"), "--config", "digits_lt", "method=gcl", *tiny], str(work), env)
    run_dir = work / "runs" / "digits_lt_gcl"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == [1, 2] and "top1" in summary["test"], out
    ev = _run([str(bin_ / "ltk-eval"), "--config", "digits_lt", "--checkpoint", str(run_dir / "checkpoint.pt"),
               "--json", str(work / "e.json"), "method=gcl", *tiny], str(work), env)
    assert json.loads((work / "e.json").read_text())["top1"] == pytest.approx(summary["test"]["top1"]), ev
    cmp = _run([str(bin_ / "ltk-compare"), "--config", "digits_lt", "--methods", "ce", "--out", "cmp",
                "optim.epochs=1", "train.max_steps_per_epoch=2", "model.width=4", "train.figures=false",
                "train.tensorboard=false"], str(work), env)
    assert "| method" in cmp and (work / "cmp" / "ce_s0" / "summary.json").exists()
    assert sorted(os.listdir(work)) == ["cmp", "e.json", "runs"]   # nothing written outside the run folders
