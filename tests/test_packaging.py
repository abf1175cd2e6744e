"""mpsclip.kernels / .export / .serve / .bench import both from a plain checkout and from a built wheel.

Each import runs in a fresh ``python -S`` so that the editable install's finder (a ``.pth`` file in
site-packages) is not active: site-packages is only on PYTHONPATH for the dependencies.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from extras import require

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("kernels", "export", "serve", "bench")
# find_spec resolves a subpackage without running it (kernels and export import torch: seconds); bench runs.
PROBE = (
    "import importlib.util, json, mpsclip.bench;"
    "names = ('kernels', 'export', 'serve', 'bench', 'engines');"
    "print(json.dumps({n: importlib.util.find_spec('mpsclip.' + n).origin for n in names}))"
)


def _import_without_site(path_first: Path, cwd: Path) -> dict[str, str]:
    env = {"PYTHONPATH": f"{path_first}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-S", "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_plain_checkout_imports_the_top_level_folders_as_mpsclip_subpackages(tmp_path: Path) -> None:
    files = _import_without_site(ROOT, cwd=tmp_path)
    for name in TOP_LEVEL:
        assert Path(files[name]) == ROOT / name / "__init__.py"
    assert Path(files["engines"]) == ROOT / "mpsclip" / "engines" / "__init__.py"


def test_built_wheel_holds_every_package_and_imports_from_itself(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy, so the build writes no build/ or egg-info into the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
    for name in ("mpsclip", *TOP_LEVEL):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", wheels, source]
    done = subprocess.run(build, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "BuildBackendWarning" not in done.stdout + done.stderr  # packages and license as setuptools wants them
    (wheel,) = wheels.glob("mpsclip-*.whl")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
        names = set(archive.namelist())
    assert {"mpsclip/configs/arch/MPS-Tiny.json", "mpsclip/serve/static/index.html"} <= names
    files = _import_without_site(unpacked, cwd=tmp_path)
    for name in (*TOP_LEVEL, "engines"):
        assert Path(files[name]).is_relative_to(unpacked), files[name]


def test_a_missing_extra_skips_on_a_laptop_and_fails_where_extras_are_expected(monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("MPSCLIP_REQUIRE_EXTRAS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no_such_extra"):
        require("no_such_extra")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no_such_extra"):
        require("no_such_extra")
    assert require("json").dumps([1]) == "[1]"
