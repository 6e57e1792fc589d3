"""The editable install (`requirements.txt` is `-e .[test]`) makes every module import
from any folder, as the REPL lines of the README do."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_INSTALLED = {"app"}  # the explorer is a Streamlit page, run from the repository


def test_every_top_level_module_is_installed():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "py-modules"]
    assert sorted(listed) == sorted({p.stem for p in ROOT.glob("*.py")} - NOT_INSTALLED)


def test_the_modules_import_from_another_folder(tmp_path):
    """Found (not executed, so no JAX starts) from a folder outside the repository."""
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "py-modules"]
    probe = ("import importlib.util, sys; "
             "print([m for m in sys.argv[1:] if importlib.util.find_spec(m) is None])")
    out = subprocess.run([sys.executable, "-c", probe, *listed], cwd=tmp_path, check=True,
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == "[]"
