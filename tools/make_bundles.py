"""Write every bundle's shared configs from one template and a small override file per bundle.

Sources (edit these, never the generated files):

* ``templates/base/configs/`` — the configs all bundles share (``train.json``, ``inference.json``, ``evaluate.json``,
  ``calibrate.json``, ``multi_gpu_*.json``, ``metadata.json``, ``logging.conf``). Values every bundle must set are
  ``"<required>"``; a generated file that still holds one is an error naming the bundle, the file and the id.
* ``templates/bundles/<bundle>/configs/<file>`` — what differs for one bundle, addressed by named config ids
  (``"train#dataloader#batch_size": 4``), never by list positions.

A base config and its override are merged the way ``python -m monai.bundle run --config_file "[base, override]"``
merges them (``ConfigParser.load_config_files``: ``a#b`` ids reach into nested sections, ``+id`` extends a list or
dict, anything else replaces). Configs that are overlays themselves (their keys are ids into ``train.json``, as
in ``evaluate.json``) merge key by key: an override key replaces the base key with the same id, new keys come
last, which is the order MONAI applies them in. The result is written self-contained (Model Zoo style) into
``bundles/<bundle>/configs/`` with a ``_generated_from_`` note. Files a bundle has that the template does not
(``datalist.json``, ``train_dice_ce.json``, ``dynunet.json``, ...) are the bundle's own and are not touched.

Usage::

    python tools/make_bundles.py          # write all bundles
    python tools/make_bundles.py --check  # exit 1 and name the files that differ (tests/test_bundle_templates.py)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from monai.bundle import ConfigParser
from monai.bundle.utils import ID_SEP_KEY, MERGE_KEY, merge_kv

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "templates"
BASE = TEMPLATES / "base" / "configs"
OVERRIDES = TEMPLATES / "bundles"
BUNDLES = ROOT / "bundles"
REQUIRED = "<required>"
# the Model Zoo validates metadata.json against its schema; the note goes only into configs MONAI runs
NO_NOTE = {"metadata.json"}


def id_parts(key: str) -> list[str]:
    """The levels of a config id; MONAI accepts ``#`` as well as ``::`` between them."""
    return key.removeprefix(MERGE_KEY).replace("#", ID_SEP_KEY).split(ID_SEP_KEY)


def bundle_names() -> list[str]:
    """The bundles generated from the template: one folder each under ``templates/bundles``."""
    return sorted(p.name for p in OVERRIDES.iterdir() if p.is_dir())


def is_overlay(config: dict) -> bool:
    """True for configs whose keys are ids into another config (``validate#handlers``), e.g. ``evaluate.json``."""
    return any(len(id_parts(key)) > 1 for key in config)


def merge_plain(base: dict, override: dict) -> dict:
    """``merge`` for files MONAI does not parse (``metadata.json``): ids reach into nested dicts, values replace.

    ``ConfigParser`` would also rename keys it considers deprecated (``optional_packages_version``), which the
    metadata schema still lists.
    """
    merged = copy.deepcopy(base)
    for key, value in copy.deepcopy(override).items():
        *parents, last = id_parts(key)
        node = merged
        for part in parents:
            node = node[part]
        node[last] = value
    return merged


def merge(base: dict, override: dict) -> dict:
    """Merge ``override`` into a copy of ``base`` with MONAI's multi-file semantics (see the module docstring)."""
    if is_overlay(base):
        merged = copy.deepcopy(base)
        merged.update(copy.deepcopy(override))
        return merged
    parser = ConfigParser(config=copy.deepcopy(base))
    for key, value in copy.deepcopy(override).items():
        merge_kv(parser, key, value)
    return parser.get()


def check_ids(override: dict, where: str) -> None:
    """Refuse override keys that address a list position (``train#handlers#0``): they break on any list edit."""
    for key in override:
        if any(p.lstrip("-").isdigit() for p in id_parts(key)):
            raise ValueError(f"{where}: key {key!r} addresses a list position; give the entry a named id instead")


def find_required(value: object, path: str = "") -> list[str]:
    """Ids whose value is still the ``"<required>"`` placeholder."""
    if value == REQUIRED:
        return [path or "<root>"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in find_required(v, f"{path}#{k}" if path else k)]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in find_required(v, f"{path}[{i}]")]
    return []


def render(name: str) -> dict[str, str]:
    """The text of every generated file of bundle ``name``, keyed by its path inside the bundle."""
    files = {}
    for src in sorted(BASE.iterdir()):
        rel = f"configs/{src.name}"
        over_path = OVERRIDES / name / "configs" / src.name
        if src.suffix != ".json":
            files[rel] = (over_path if over_path.is_file() else src).read_text()
            continue
        base = json.loads(src.read_text())
        override = json.loads(over_path.read_text()) if over_path.is_file() else {}
        check_ids(override, str(over_path.relative_to(ROOT)))
        merged = merge_plain(base, override) if src.name in NO_NOTE else merge(base, override)
        missing = find_required(merged)
        if missing:
            raise ValueError(
                f"bundle {name}: {rel} still needs a value for {', '.join(missing)}; "
                f"set it in {over_path.relative_to(ROOT)}"
            )
        if src.name not in NO_NOTE:
            source = f"templates/base/{rel}" + (f" + templates/bundles/{name}/{rel}" if over_path.is_file() else "")
            note = f"generated from {source} by tools/make_bundles.py; edit those, not this file"
            merged = {"_generated_from_": note, **merged}
        files[rel] = json.dumps(merged, indent=4) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a bundle differs")
    args = parser.parse_args(argv)
    stale = []
    for name in bundle_names():
        for rel, text in render(name).items():
            path = BUNDLES / name / rel
            if path.is_file() and path.read_text() == text:
                continue
            if args.check:
                stale.append(str(path.relative_to(ROOT)))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("differs from its template (run python tools/make_bundles.py):\n  " + "\n  ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
