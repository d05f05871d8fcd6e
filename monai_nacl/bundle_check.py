"""Offline Model Zoo-equivalent checks for the bundles in ``bundles/``.

Run ``python -m monai_nacl.bundle_check [BUNDLE ...]`` with bundle folders (default: every ``bundles/*_segmentation``
of the repository, or, installed from a wheel, the bundles shipped in the package). For each
bundle it checks the zoo's file layout, validates ``configs/metadata.json`` against both metadata schemas
(offline copies shipped in ``monai_nacl/schemas``, copied into ``<bundle>/eval/`` at check time), that
``ConfigWorkflow.check_properties()`` is empty for train and infer, the ids MONAI Label reads, that
``models/model.pt`` (when the bundle ships weights) is a plain state_dict loading with ``weights_only=True``, that
every shipped ``models/*.pt`` holds a temperature fitted for its own weights with a matching
``*.calibration.json`` record, and runs MONAI's
``verify_net_in_out`` and ``ckpt_export``. Exit status 1 when anything fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

REQUIRED_FILES = (
    "LICENSE",
    "configs/metadata.json",
    "configs/train.json",
    "configs/evaluate.json",
    "configs/inference.json",
    "configs/multi_gpu_train.json",
    "configs/multi_gpu_evaluate.json",
    "configs/multi_gpu_calibrate.json",
    "configs/logging.conf",
    "docs/README.md",
)
SCHEMAS = {
    "meta_schema_20220324.json": "662135097106b71067cd1fc657f8720f",
    "meta_schema_20240725.json": "06954cad2cc5d3784e72077ac76f0fc8",
}
MONAI_LABEL_IDS = ("network", "network_def", "train#dataset#data", "validate#dataset#data")
# the bundles shipped inside the package (a wheel), then those of the repository (a source checkout)
PACKAGED_BUNDLES = Path(__file__).resolve().parent / "_bundles"
REPO_BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def find_bundle(name: str) -> Path:
    """The folder of bundle ``name``: the copy shipped in the installed package, else ``bundles/<name>`` of the
    repository this package runs from.

    Raises:
        FileNotFoundError: neither holds ``<name>/configs/metadata.json``; the message names both places.
    """
    for base in (PACKAGED_BUNDLES, REPO_BUNDLES):
        if (base / name / "configs" / "metadata.json").is_file():
            return base / name
    raise FileNotFoundError(
        f"bundle {name!r} not found in {PACKAGED_BUNDLES} (installed package) or {REPO_BUNDLES} (repository); "
        "pass the bundle folder instead."
    )


def default_schema_dir() -> Path:
    """``MONAI_NACL_SCHEMA_DIR`` if set, else the copies shipped in the package (``monai_nacl/schemas``)."""
    return Path(os.environ.get("MONAI_NACL_SCHEMA_DIR", Path(__file__).resolve().parent / "schemas"))


def check_bundle(
    bundle: str | Path, schema_dir: str | Path | None = None, export: bool = True, dataset_dir: str | Path | None = None
) -> list[str]:
    """Run every check on one bundle; return the list of problems (empty when it passes).

    ``dataset_dir`` overrides the bundle's data location: the train workflow's ``initialize`` checks the
    datalist, so bundles of real datasets need their data (the quickstart generates its own).
    """
    from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out

    bundle = Path(bundle).resolve()
    problems: list[str] = []
    for rel in REQUIRED_FILES:
        if not (bundle / rel).is_file():
            problems.append(f"missing {rel}")
    if problems:
        return problems
    configs = bundle / "configs"
    meta_file = str(configs / "metadata.json")
    eval_dir = bundle / "eval"
    eval_dir.mkdir(exist_ok=True)

    schema_dir = Path(schema_dir) if schema_dir else default_schema_dir()
    for name, md5 in SCHEMAS.items():
        src = schema_dir / name
        if not src.is_file():
            problems.append(f"schema {src} not found (set MONAI_NACL_SCHEMA_DIR)")
            continue
        dst = eval_dir / name
        shutil.copyfile(src, dst)
        try:
            verify_metadata(meta_file=meta_file, filepath=str(dst), hash_val=md5)
        except Exception as e:  # verify_metadata raises ValidationError and others
            problems.append(f"metadata invalid against {name}: {e}")

    meta = json.loads(Path(meta_file).read_text())
    fmt = meta.get("network_data_format", {})
    if "image" not in fmt.get("inputs", {}):
        problems.append("metadata input key must be 'image'")
    if "pred" not in fmt.get("outputs", {}) or not fmt["outputs"]["pred"].get("channel_def"):
        problems.append("metadata output key must be 'pred' with label names in channel_def")

    train_cfg = [str(configs / "train.json")]
    for workflow_type, cfg in (("train", train_cfg), ("infer", str(configs / "inference.json"))):
        wf = ConfigWorkflow(
            config_file=cfg,
            meta_file=meta_file,
            logging_file=str(configs / "logging.conf"),
            workflow_type=workflow_type,
            bundle_root=str(bundle),
            **({"dataset_dir": str(dataset_dir)} if dataset_dir else {}),
        )
        try:
            wf.initialize()
        except Exception as e:
            cause = e.__cause__ or e
            problems.append(f"{workflow_type} workflow does not initialize ({cause}); is dataset_dir set?")
            continue
        missing = wf.check_properties()
        if missing:
            problems.append(f"{workflow_type} workflow lacks required properties: {missing}")

    parser = ConfigParser()
    parser.read_config(configs / "train.json")
    for key in MONAI_LABEL_IDS:
        if key not in parser:
            problems.append(f"train.json lacks the id '{key}' that MONAI Label reads")
    # MONAI Label inserts a CheckpointLoader into train#handlers and reads every entry's "_target_"
    if "train#handlers" in parser and not all(isinstance(h, dict) for h in parser["train#handlers"]):
        problems.append("train#handlers must hold dicts only (no '@' references): MONAI Label reads each '_target_'")

    weights = bundle / "models" / "model.pt"
    if weights.is_file():
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                problems.append("models/model.pt is not a flat state_dict of tensors")
        except Exception as e:
            problems.append(f"models/model.pt does not load with weights_only=True: {e}")
        from monai_nacl.conformal import check_conformal_record, conformal_record_path
        from monai_nacl.temperature import check_calibration_record

        # every shipped model carries a temperature fitted for its own weights, and the record that says so
        for shipped in sorted((bundle / "models").glob("*.pt")):
            try:
                problems += [f"calibration: {p}" for p in check_calibration_record(shipped)]
            except ValueError as e:
                problems.append(f"calibration: {e}")
            # a conformal record is optional, but one that ships must belong to these weights and temperatures
            if conformal_record_path(shipped).is_file():
                problems += [f"conformal: {p}" for p in check_conformal_record(shipped)]
    else:
        # bundles that ship configs only (no trained weights yet): export a freshly initialised network instead
        parser = ConfigParser()
        parser.read_config(configs / "inference.json")
        parser["bundle_root"] = str(bundle)
        weights = eval_dir / "model_untrained.pt"
        torch.save(parser.get_parsed_content("network_def").state_dict(), weights)

    override = {"bundle_root": str(bundle)}
    try:
        verify_net_in_out(
            net_id="network_def",
            meta_file=meta_file,
            config_file=str(configs / "inference.json"),
            device="cpu",
            n=1,
            any=8,
            **override,
        )
    except Exception as e:
        problems.append(f"verify_net_in_out failed: {e}")
    if export:
        try:
            ckpt_export(
                net_id="network_def",
                filepath=str(eval_dir / "model.ts"),
                ckpt_file=str(weights),
                meta_file=meta_file,
                config_file=str(configs / "inference.json"),
                **override,
            )
            torch.jit.load(str(eval_dir / "model.ts"))
        except Exception as e:
            problems.append(f"ckpt_export failed: {e}")
    return problems


def all_bundles() -> list[Path]:
    """Every ``*_segmentation`` bundle shipped in the installed package, else every one of the repository."""
    for base in (PACKAGED_BUNDLES, REPO_BUNDLES):
        found = sorted(p for p in base.glob("*_segmentation") if (p / "configs" / "metadata.json").is_file())
        if found:
            return found
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*", type=Path, help="bundle folders (default: bundles/*_segmentation, see above)")
    ap.add_argument("--schema-dir", type=Path, default=None)
    ap.add_argument("--no-export", action="store_true", help="skip ckpt_export (TorchScript)")
    ap.add_argument(
        "--dataset-dir",
        action="append",
        default=[],
        metavar="BUNDLE=PATH",
        help="data folder for a bundle, e.g. hippocampus_mri_nacl_segmentation=/data/Task04_Hippocampus",
    )
    args = ap.parse_args(argv)
    data = dict(item.split("=", 1) for item in args.dataset_dir)
    bundles = args.bundles or all_bundles()
    if not bundles:
        ap.error(f"no bundles found in {REPO_BUNDLES} or {PACKAGED_BUNDLES}: give the bundle folders to check")
    failed = 0
    for bundle in bundles:
        problems = check_bundle(bundle, args.schema_dir, export=not args.no_export, dataset_dir=data.get(bundle.name))
        print(f"{'FAIL' if problems else 'ok  '} {bundle}")
        for p in problems:
            print(f"     - {p}")
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
