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


def _runtime_closure(root: str) -> list[importlib.metadata.Distribution]:
    """``root``'s installed distribution and its declared runtime dependencies, recursively
    (requirements that only apply under an extra are left out, as pip leaves them out)."""
    try:
        from packaging.markers import Marker
    except ImportError:  # pragma: no cover - packaging ships with pip/setuptools
        from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        dist = importlib.metadata.distribution(name)
        seen[name] = dist
        for req in dist.requires or []:
            spec, _, marker = req.partition(";")
            if marker.strip() and ("extra" in marker or not Marker(marker).evaluate()):
                continue
            match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
            assert match is not None, req
            todo.append(match.group(1))
    return list(seen.values())


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch installed")
def test_installed_wheel_imports_and_runs_with_only_torch(wheel: Path, tmp_path: Path) -> None:
    """Issue 13 item 4: torch does not require numpy, so neither may matrixopt.

    A fresh venv sees exactly torch and its declared runtime dependencies (a
    directory of links to their installed files, put on the venv's path by a
    .pth file -- no download) and the matrixopt wheel; numpy must not be
    importable there. Importing matrixopt, orthogonalising (every preset is
    built at import, the degree-9 one by the Remez generator) and one Muon step
    must work, and numpy must not have been imported.
    """
    dists = _runtime_closure("torch")
    names = {d.metadata["Name"].lower() for d in dists}
    assert "numpy" not in names, f"torch declares numpy here: {sorted(names)}"
    linked = tmp_path / "torch_only"
    linked.mkdir()
    for dist in dists:
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            src = Path(str(dist.locate_file(top)))
            if src.exists() and not (linked / top).exists():
                (linked / top).symlink_to(src, target_is_directory=src.is_dir())
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   capture_output=True, text=True, timeout=120)
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(py), "-I", "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "torch_only.pth").write_text(f"{linked}\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    "--target", purelib, str(wheel)], check=True, capture_output=True, text=True,
                   timeout=300)
    script = f"""
import importlib.util, sys
assert importlib.util.find_spec("numpy") is None, "numpy is importable in the torch-only venv"
import torch
import matrixopt
from matrixopt.linalg import orthogonalize
assert matrixopt.__file__.startswith({purelib!r}), matrixopt.__file__
g = torch.Generator().manual_seed(0)
G = torch.randn(64, 32, generator=g)
for preset in ("polar_express", "polar_express_nonic"):
    sv = torch.linalg.svdvals(orthogonalize(G, coefficients=preset).double())
    assert 0.5 < float(sv.min()) and float(sv.max()) < 1.5, (preset, sv)  # worst case 0.48
p = torch.nn.Parameter(torch.randn(32, 16, generator=g))
p.grad = torch.randn(32, 16, generator=g)
before = p.detach().clone()
opt = matrixopt.Muon([p], lr=0.02)
opt.step()
assert torch.isfinite(p).all() and not torch.equal(p.detach(), before)
assert "numpy" not in sys.modules, "matrixopt imported numpy"
print("torch-only OK", torch.__version__)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([str(py), "-I", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch-only OK" in proc.stdout
