"""Prepare the GPU run of ``tools/gpu_hippocampus.py`` for the lent device machine, and print its command.

The device machine starts bare from an image that has PyTorch but not MONAI, pytorch-ignite, nibabel or fire
(``monai.bundle``'s command line), reaches no network, and receives only this checkout (64 MiB at most; the
``../shared`` data beside it stays behind). So this script, run here:

1. downloads those packages as wheels for the device's Python (3.12, x86-64), at the versions installed here, into
   ``.device/whl``;
2. copies the MSD Task04 Hippocampus data into ``.device/hippocampus`` (about 15 MB);
3. checks that the checkout that travels (tracked and untracked files git does not ignore, plus ``.device``) stays
   under the limit;
4. prints the ``run`` call: its command installs the wheels, runs ``gpu_hippocampus.py`` into ``/tmp/gpu`` and packs
   what comes back into ``$OUT`` (at most 8 files: the two final models in 15 MiB parts, one archive of logs and
   records, the console log); ``gpu_hippocampus.py --unpack`` puts them together again here.

    python tools/prepare_device_run.py [--data ../shared/data/hippocampus]

``.device/`` is git-ignored; rerunning refreshes it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE_DIR = ROOT / ".device"
# what the device image lacks (KINDS.md of the device tool lists what it has); their own needs are there
PACKAGES = ("monai", "pytorch-ignite", "nibabel", "fire", "termcolor")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT_MIB = 64
TIMEOUT_S = 600
COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/whl/*.whl "
    "&& export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && set -o pipefail && "
    "python3 tools/gpu_hippocampus.py --out /tmp/gpu --data .device/hippocampus --pack $OUT 2>&1 "
    "| tee $OUT/console.log"
)


def _replace(dest: Path, fill) -> None:
    """``fill`` a fresh folder beside ``dest``, then swap it in by renames (``dest`` → ``dest.old``, new → ``dest``):
    a failure while filling keeps the previous ``dest``, and a run interrupted between the renames is completed by
    the next one (which finds ``dest`` missing and ``dest.old`` there)."""
    tmp, old = dest.with_name(dest.name + ".new"), dest.with_name(dest.name + ".old")
    if not dest.exists() and old.exists():
        old.rename(dest)  # an earlier run stopped between its two renames
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def wheel_pins() -> list[str]:
    """``name==version`` of each of ``PACKAGES`` as installed here."""
    pins = []
    for name in PACKAGES:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed here: install the project's environment first") from None
    return pins


def download_wheels(dest: Path, pins: list[str]) -> list[Path]:
    """The wheels of ``pins`` for CPython 3.12 on x86-64 Linux (the previous ones kept if the download fails)."""

    def fill(folder: Path) -> None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
        cmd += ["--implementation", "cp", *[arg for p in PLATFORMS for arg in ("--platform", p)], "-d", str(folder)]
        result = subprocess.run(cmd + pins, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"pip download failed for {pins}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        wheels = sorted(folder.glob("*.whl"))
        if len(wheels) != len(pins):
            raise SystemExit(f"expected {len(pins)} wheels, got {[w.name for w in wheels]}")

    _replace(dest, fill)
    return sorted(dest.glob("*.whl"))


def check_data(src: Path) -> None:
    if not (src / "dataset.json").is_file():
        raise SystemExit(f"--data {src}: no MSD Task04 dataset.json there")
    for folder in ("imagesTr", "labelsTr"):
        if not any((src / folder).glob("*.nii.gz")):
            raise SystemExit(f"--data {src}: no {folder}/*.nii.gz there")


def copy_data(src: Path, dest: Path) -> None:
    """The cases of ``src`` (checked first) into ``dest`` (the previous copy kept if copying fails)."""
    check_data(src)

    def fill(folder: Path) -> None:
        for name in ("dataset.json", "README.md"):
            if (src / name).is_file():
                shutil.copy2(src / name, folder / name)
        for sub in ("imagesTr", "labelsTr"):
            shutil.copytree(src / sub, folder / sub)

    _replace(dest, fill)


def travelling_bytes() -> int:
    """Bytes of what a device call sends: files git tracks or would track (not ignored), and ``.device``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    total = sum((ROOT / p.decode()).stat().st_size for p in listed if p and (ROOT / p.decode()).is_file())
    return total + sum(f.stat().st_size for f in DEVICE_DIR.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hippocampus")
    args = ap.parse_args(argv)
    check_data(args.data)  # before a download of several minutes
    wheels = download_wheels(DEVICE_DIR / "whl", wheel_pins())
    copy_data(args.data, DEVICE_DIR / "hippocampus")
    size = travelling_bytes()
    print(f"wheels: {', '.join(w.name for w in wheels)}")
    print(
        f"data: {DEVICE_DIR / 'hippocampus'} ({sum(1 for _ in (DEVICE_DIR / 'hippocampus').rglob('*.nii.gz'))} files)"
    )
    print(f"travelling: {size / 2**20:.1f} MiB of at most {LIMIT_MIB}")
    if size >= LIMIT_MIB * 2**20:
        print("too large for a device call: ignore or remove untracked files first", file=sys.stderr)
        return 1
    print("\nThe device call (the run tool):")
    print(f'  carry: [".device"]\n  timeout_s: {TIMEOUT_S}\n  command: {COMMAND}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
