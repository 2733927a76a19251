"""Packaging: the wheel holds only the package (+ py.typed and metadata), the
version has one source, and ``python -m matrixopt`` works from an installed wheel."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import matrixopt
from matrixopt.__main__ import backends, main

ROOT = Path(__file__).resolve().parents[1]
# the [project] table's version (tomllib is 3.11+, the package supports 3.10)
VERSION = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(),
                    re.MULTILINE).group(1)  # type: ignore[union-attr]


def _has_build_backend() -> bool:
    return importlib.util.find_spec("setuptools") is not None


def test_version_is_the_distribution_metadata() -> None:
    # pyproject.toml is the single source; the package reads the installed metadata
    assert matrixopt.__version__ == importlib.metadata.version("matrixopt")
    assert "__version__ = \"" not in (ROOT / "matrixopt" / "__init__.py").read_text()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _has_build_backend():
        pytest.skip("building the wheel needs setuptools (the build backend) installed")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    # build from a copy so the worktree gets no build/ or *.egg-info, with the
    # directories that must stay out of the wheel present
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".venv", "build", "*.egg-info")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("matrixopt", "tests", "benchmarks", "examples"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(out), str(src)], check=True, cwd=tmp,
                   capture_output=True, text=True, timeout=300)
    (whl,) = out.glob("matrixopt-*.whl")
    return whl


def test_wheel_contains_only_the_package(wheel: Path) -> None:
    assert wheel.name == f"matrixopt-{VERSION}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"matrixopt-{VERSION}.dist-info/"
    stray = [n for n in names if not (n.startswith(("matrixopt/", dist_info)))]
    assert not stray, f"files outside the package: {stray}"
    assert "matrixopt/py.typed" in names
    assert "matrixopt/__main__.py" in names
    source = {str(p.relative_to(ROOT)).replace(os.sep, "/")
              for p in (ROOT / "matrixopt").rglob("*.py")}
    assert source <= set(names), f"modules missing from the wheel: {source - set(names)}"
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)

    meta = zipfile.ZipFile(wheel).read(dist_info + "METADATA").decode()
    assert f"Version: {VERSION}\n" in meta
    assert "Requires-Dist: torch" in meta
    assert "Provides-Extra: test" in meta


def test_python_m_matrixopt_from_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    "--target", str(site), str(wheel)], check=True, capture_output=True,
                   text=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site), "TRITON_INTERPRET": "0"}
    # cwd outside the source tree, so the installed copy is the one imported
    proc = subprocess.run([sys.executable, "-m", "matrixopt"], cwd=tmp_path, env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert str(site) in subprocess.run(
        [sys.executable, "-c", "import matrixopt; print(matrixopt.__file__)"], cwd=tmp_path,
        env=env, capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0].split()
    assert first == ["matrixopt", VERSION], first
    for label in ("torch", "CUDA available", "Triton importable", "Triton interpreter"):
        assert label in out
    assert out.count("  OK    ") == 3 and "FAIL" not in out
    assert out.rstrip().endswith("self-check: OK")


def test_main_reports_failure_and_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> str:
        raise AssertionError("deliberately wrong")

    assert main([], checks=[("fine", lambda: "ok"), ("broken", broken)]) == 1
    out = capsys.readouterr().out
    assert "  OK    fine: ok" in out
    assert "  FAIL  broken: AssertionError: deliberately wrong" in out
    assert out.rstrip().endswith("self-check: FAIL")
    assert main([], checks=[("fine", lambda: "ok")]) == 0


def test_backends_report() -> None:
    import torch

    info = dict(backends())
    assert info["matrixopt"] == matrixopt.__version__
    assert info["torch"] == torch.__version__
    assert info["CUDA available"].startswith("yes" if torch.cuda.is_available() else "no")
