"""The package as a user installs it: a wheel, not this checkout (``pip install .``, not ``-e``)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_BUNDLE = "phantom_nacl_segmentation"
PACKAGED = f"monai_nacl._bundles.{QUICKSTART_BUNDLE}"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_is_listed_for_the_wheel():
    """The package-dir mapping of the shipped bundle needs an explicit package list; a new subpackage left out of it
    would be missing from every wheel."""
    from setuptools import find_packages

    config = _pyproject()["tool"]["setuptools"]
    assert sorted(config["packages"]) == sorted([*find_packages(str(ROOT), include=["monai_nacl*"]), PACKAGED])
    assert config["package-dir"] == {PACKAGED: f"bundles/{QUICKSTART_BUNDLE}"}


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of what the wheel is made of, so no build/ or egg-info of an earlier build (nor a module
    deleted since) can slip in."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "monai_nacl", src / "monai_nacl", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(ROOT / "bundles" / QUICKSTART_BUNDLE, src / "bundles" / QUICKSTART_BUNDLE)  # run outputs too
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(tmp_path / "dist")]
    # offline when this environment meets pyproject.toml's build requirement (setuptools >= 77, which writes wheels itself)
    version = tuple(int(v) for v in importlib.metadata.version("setuptools").split(".")[:2])
    if version >= (77, 0):
        cmd.append("--no-build-isolation")
    subprocess.run(cmd, check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("monai_nacl-*.whl")
    return wheel


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_wheel_runs_bundle_check_and_quickstart_outside_the_repository(tmp_path):
    wheel = _build_wheel(tmp_path)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True
    )
    work = tmp_path / "work"  # outside the repository: nothing there can be imported by accident
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("MONAI_NACL_SCHEMA_DIR", None)  # the schemas must come from the wheel

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    # the wheel, not this checkout's editable install, is what runs
    found = run("-c", "import monai_nacl; print(monai_nacl.__file__)").strip()
    assert Path(found).resolve().is_relative_to(site.resolve()), found
    bundle = site / "monai_nacl" / "_bundles" / QUICKSTART_BUNDLE
    shipped = _files(bundle)
    assert {"LICENSE", "configs/train.json", "configs/metadata.json", "models/model.pt"} <= set(shipped)
    assert {"meta_schema_20220324.json", "meta_schema_20240725.json"} <= {p.name for p in site.glob("monai_nacl/*/*")}
    if (ROOT / ".git").exists() and shutil.which("git"):  # exactly the bundle's files under version control
        tracked = subprocess.run(
            ["git", "ls-files", f"bundles/{QUICKSTART_BUNDLE}"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        assert shipped == sorted(str(Path(p).relative_to(f"bundles/{QUICKSTART_BUNDLE}")) for p in tracked)

    # the quickstart finds its bundle in the wheel and writes only to --out
    out = run("-m", "monai_nacl.quickstart", "--epochs", "1", "--out", str(work / "quickstart"))
    assert f"== bundle {bundle.resolve()}" in out
    assert (work / "quickstart" / "eval" / "metrics.csv").is_file()
    assert _files(bundle) == shipped

    out = run("-m", "monai_nacl.bundle_check", str(bundle))
    assert f"ok   {bundle}" in out.splitlines()  # the schemas of the wheel validate the shipped bundle
