"""Where quick_lab was imported from, and that the copy carries what the checkout has.

Two layouts (quick_lab/build/paths.py): a checkout (editable install or the repository on sys.path),
where the package reads the top-level ``kernels/`` and ``results/``, and an installed wheel, which
carries the CUDA sources as ``quick_lab/kernels/`` and the committed dispatch tables as
``quick_lab/tables/<gpu>/dispatch.json``. With ``QUICK_LAB_EXPECT_INSTALLED=1`` (the second stage of
.ci/run, which runs this suite from a temporary directory against ``pip install .``) the installed
layout is required; otherwise the checkout layout is. The repository is found from this file, never
from the package.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import quick_lab
from quick_lab.build import paths

REPO = Path(__file__).resolve().parents[1]
INSTALLED = os.environ.get("QUICK_LAB_EXPECT_INSTALLED") == "1"
PKG = Path(quick_lab.__file__).resolve().parent

# The data packages pyproject.toml maps in from outside quick_lab/.
DATA_PACKAGES = {"quick_lab.kernels": "kernels", "quick_lab.tables": "results"}


def _files(root: Path, pattern: str) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.glob(pattern)) if p.is_file()}


def _repo_kernels() -> dict[str, bytes]:
    return _files(REPO / "kernels", "*.cu*")


def _repo_tables() -> dict[str, bytes]:
    return _files(REPO / "results", "*/dispatch.json")


def _py_files(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in _files(root, "**/*.py").items() if "__pycache__" not in k}


def test_repo_has_kernels_and_tables():
    assert _repo_kernels(), f"no kernels/*.cu* under {REPO}"
    assert _repo_tables(), f"no results/*/dispatch.json under {REPO}"


@pytest.mark.skipif(INSTALLED, reason="QUICK_LAB_EXPECT_INSTALLED=1: the installed layout is checked instead")
def test_checkout_layout(monkeypatch):
    assert PKG == REPO / "quick_lab", f"quick_lab imported from {PKG}, not from the checkout {REPO}"
    assert paths.CHECKOUT == REPO
    assert not paths.PACKAGED_KERNELS.exists(), (
        f"{paths.PACKAGED_KERNELS} exists in the checkout: it would shadow the top-level kernels/")
    assert paths.KERNEL_DIR == REPO / "kernels"
    monkeypatch.delenv(paths.RESULTS_ROOT_ENV, raising=False)
    assert paths.results_root() == REPO / "results"
    for name in _repo_tables():
        slug = name.split("/")[0]
        assert paths.dispatch_table_path(slug) == REPO / "results" / slug / "dispatch.json"


@pytest.mark.skipif(not INSTALLED, reason="set QUICK_LAB_EXPECT_INSTALLED=1 to check an installed wheel")
def test_installed_layout():
    assert REPO not in PKG.parents, f"quick_lab imported from {PKG}, inside the checkout {REPO}"
    assert PKG.parent.name in {"site-packages", "dist-packages"}, f"quick_lab imported from {PKG}"
    assert not any(Path(p or ".").resolve() == REPO for p in sys.path), f"the checkout {REPO} is on sys.path"
    assert paths.CHECKOUT is None
    assert paths.KERNEL_DIR == paths.PACKAGED_KERNELS == PKG / "kernels"
    assert paths.PACKAGED_TABLES == PKG / "tables"


@pytest.mark.skipif(not INSTALLED, reason="set QUICK_LAB_EXPECT_INSTALLED=1 to check an installed wheel")
def test_installed_kernels_are_the_repository_kernels():
    shipped = _files(paths.KERNEL_DIR, "*")
    repo = _repo_kernels()
    assert sorted(shipped) == sorted(repo), "the wheel's kernels differ from kernels/*.cu* (missing or extra files)"
    for name, data in repo.items():
        assert shipped[name] == data, f"quick_lab/kernels/{name} differs from kernels/{name}"


@pytest.mark.skipif(not INSTALLED, reason="set QUICK_LAB_EXPECT_INSTALLED=1 to check an installed wheel")
def test_installed_tables_are_the_committed_dispatch_tables(tmp_path, monkeypatch):
    shipped = _files(paths.PACKAGED_TABLES, "**/*")
    repo = _repo_tables()
    assert sorted(shipped) == sorted(repo), "the wheel's tables differ from results/*/dispatch.json (no CSVs etc.)"
    for name, data in repo.items():
        assert shipped[name] == data, f"quick_lab/tables/{name} differs from results/{name}"
    # With no measured table in the results root, dispatch falls back to the shipped one.
    monkeypatch.setenv(paths.RESULTS_ROOT_ENV, str(tmp_path))
    for name in repo:
        slug = name.split("/")[0]
        assert paths.dispatch_table_path(slug) == paths.PACKAGED_TABLES / slug / "dispatch.json"


@pytest.mark.skipif(not INSTALLED, reason="set QUICK_LAB_EXPECT_INSTALLED=1 to check an installed wheel")
def test_installed_modules_are_the_repository_modules():
    # The suite tests the checkout's code: the wheel must hold every module, unchanged.
    shipped = _py_files(PKG)
    repo = _py_files(REPO / "quick_lab")
    assert sorted(shipped) == sorted(repo), "the wheel's modules differ from quick_lab/**/*.py"
    changed = [name for name in repo if shipped[name] != repo[name]]
    assert not changed, f"installed modules differ from the checkout: {changed}"


def test_pyproject_lists_every_subpackage():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "quick_lab").rglob("*.py")
               if "__pycache__" not in p.parts}
    missing = on_disk - listed
    assert not missing, f"pyproject.toml's [tool.setuptools] packages lacks {sorted(missing)} (the wheel drops them)"
    extra = listed - on_disk - set(DATA_PACKAGES)
    assert listed - on_disk == set(DATA_PACKAGES), f"pyproject.toml lists packages with no modules: {sorted(extra)}"
    assert setuptools_cfg["package-dir"] == DATA_PACKAGES
    assert setuptools_cfg["package-data"] == {"quick_lab.kernels": ["*.cu", "*.cuh"],
                                              "quick_lab.tables": ["*/dispatch.json"]}


# pip name -> conda-forge name where they differ
CONDA_NAMES = {"cupy-cuda13x": "cupy", "nvidia-cuda-nvrtc": "cuda-nvrtc"}


def test_environment_yml_has_every_pyproject_dependency():
    # environment.yml installs the project with `pip install -e .` (no extras): conda must bring the
    # runtime, cuda13, test and dev dependencies itself, at the same lower bounds.
    import re

    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = dict.fromkeys(project["dependencies"] + extras["cuda13"] + extras["test"] + extras["dev"])
    conda = {}
    for line in (REPO / "environment.yml").read_text().splitlines():
        m = re.match(r"^  - ([A-Za-z0-9_.-]+)\s*([<>=!].*)?$", line)
        if m:
            conda[m.group(1).lower()] = (m.group(2) or "").strip()
    problems = []
    for req in wanted:
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*(.*)$", req)
        name, spec = CONDA_NAMES.get(m.group(1).lower(), m.group(1).lower()), m.group(2).strip()
        if name not in conda:
            problems.append(f"{req}: no {name} in environment.yml")
        elif spec.startswith(">=") and spec.split(",")[0] not in conda[name]:
            problems.append(f"{req}: environment.yml has {name}{conda[name]}")
    assert not problems, problems
    assert re.search(r"^  - pip:\n      - -e \.$", (REPO / "environment.yml").read_text(), re.M)
