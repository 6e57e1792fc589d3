"""The package: the editable install (`requirements.txt` is `-e .[test]`) makes every
module import from any folder, as the REPL lines of the README do; and the wheel, built
and installed into a fresh venv, is whole: its checkpoints, its commands, the explorer."""

import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MODULES = PROJECT["tool"]["setuptools"]["py-modules"]
COMMANDS = PROJECT["project"]["scripts"]


def test_every_top_level_module_is_installed():
    assert sorted(MODULES) == sorted(p.stem for p in ROOT.glob("*.py"))


@pytest.mark.slow
def test_the_modules_import_from_another_folder(tmp_path):
    """Found (not executed, so no JAX starts) from a folder outside the repository."""
    probe = ("import importlib.util, sys; "
             "print([m for m in sys.argv[1:] if importlib.util.find_spec(m) is None])")
    out = subprocess.run([sys.executable, "-c", probe, *MODULES, "pretrained"], cwd=tmp_path,
                         check=True, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == "[]"


def _run(args, cwd, **kwargs):
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=240,
                          **kwargs)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the wheel built from this checkout installed (no editable
    path). Its dependencies are this venv's, reached through a .pth line (the packages
    only: the editable install's own .pth is not processed there), so nothing is
    downloaded but the build backend."""
    work = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir",
          str(work / "dist"), str(ROOT)], cwd=work)
    (wheel,) = (work / "dist").glob("cifar10_xai-*.whl")
    venv = work / "fresh"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=work)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                      "['purelib'])"], cwd=work).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--no-index", "--quiet", str(wheel)], cwd=work)
    empty = work / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return venv, site, empty, env


@pytest.mark.slow
def test_the_wheel_loads_its_checkpoint_and_explains_from_an_empty_folder(installed):
    venv, site, empty, env = installed
    code = ("import checkpoints, numpy as np, xai_visualizations as xv\n"
            "model, variables = checkpoints.load_checkpoint()\n"
            "image = np.random.default_rng(0).uniform(size=(32, 32, 3)).astype('float32')\n"
            "heatmap, pred, score = xv.GradCAM(model).compute_gradcam(\n"
            "    variables['params'], variables['batch_stats'], image)\n"
            "print(checkpoints.__file__, heatmap.shape, round(float(heatmap.max()), 3),\n"
            "      0 <= pred < 10)\n")
    out = _run([str(venv / "bin" / "python"), "-c", code], cwd=empty, env=env)
    assert f"loading {site / 'pretrained' / 'cifar10_cnn.pkl'}" in out
    assert f"{site / 'checkpoints.py'} (32, 32) 1.0 True" in out
    assert list(empty.iterdir()) == []


@pytest.mark.slow
def test_the_wheel_installs_every_command(installed):
    venv, site, empty, env = installed
    assert set(COMMANDS) == {f"cifar10-xai-{name}" for name in
                             ("train", "demo", "evaluate", "robustness", "app")}
    for command in COMMANDS:
        out = _run([str(venv / "bin" / command), "--help"], cwd=empty, env=env)
        assert "usage:" in out.lower(), command
    assert "--checkpoint" in _run([str(venv / "bin" / "python"), "-m", "demo_xai", "--help"],
                                  cwd=empty, env=env)
    assert (site / "app.py").is_file() and (site / "pretrained" / "resnet20.json").is_file()
