"""Bundle discovery for the ``monailabel_nacl`` MONAI Label app (no MONAI Label import, so it is testable alone)."""

from __future__ import annotations

import os
import re
from pathlib import Path

INFER_CONFIGS = ("inference.json", "inference.yaml")
TRAIN_CONFIGS = ("train.json", "train.yaml")


def is_bundle(path: Path) -> bool:
    """A folder with ``configs/metadata.json`` and an inference or train config."""
    configs = Path(path) / "configs"
    return (configs / "metadata.json").is_file() and any((configs / c).is_file() for c in INFER_CONFIGS + TRAIN_CONFIGS)


def has_config(bundle: Path, names: tuple[str, ...]) -> bool:
    return any((Path(bundle) / "configs" / n).is_file() for n in names)


def has_weights(bundle: Path) -> bool:
    """MONAI Label's bundle inference needs ``models/model.pt`` or ``models/model.ts``."""
    models = Path(bundle) / "models"
    return (models / "model.pt").is_file() or (models / "model.ts").is_file()


def find_bundles(spec: str | os.PathLike | None, default: Path) -> dict[str, Path]:
    """Bundles named by the app's ``bundles`` option: model name -> bundle folder, sorted by name.

    ``spec`` is one or more paths separated by ``os.pathsep`` or ``,``; each is a bundle itself or a folder whose
    subfolders are bundles (anything else in it is ignored). Empty or ``None`` means ``default``. A path that does
    not exist raises ``FileNotFoundError``; two bundles with the same folder name raise ``ValueError``.
    """
    text = os.fspath(spec).strip() if spec is not None else ""
    roots = [Path(p).expanduser() for p in re.split(rf"[,{re.escape(os.pathsep)}]", text) if p.strip()] or [
        Path(default)
    ]
    found: dict[str, Path] = {}
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"bundles: {root} is not a folder")
        candidates = [root] if is_bundle(root) else sorted(p for p in root.iterdir() if p.is_dir() and is_bundle(p))
        for bundle in candidates:
            name = bundle.resolve().name
            if name in found and found[name] != bundle.resolve():
                raise ValueError(f"bundles: two bundles named {name!r}: {found[name]} and {bundle.resolve()}")
            found[name] = bundle.resolve()
    return dict(sorted(found.items()))
