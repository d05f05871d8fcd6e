"""README command 1: train, calibrate and evaluate the quickstart bundle on synthetic phantoms.

``python -m monai_nacl.quickstart [--out runs/quickstart] [--epochs 60] [--bundle PATH]`` runs the bundle
``phantom_nacl_segmentation`` (by default the copy shipped in the installed package, or ``bundles/`` of the
repository, see :func:`~monai_nacl.bundle_check.find_bundle`) through MONAI's ``ConfigWorkflow``: train.json
(NACL, prior from the
transform), calibrate.json (temperature fitted on the validation phantoms) and evaluate.json (test
phantoms: Dice, HD95, ECE, class-wise ECE, NLL, Brier; reliability diagrams). Everything it writes goes to
``--out``; nothing is written into the bundle folder (it may be read-only), and its shipped model is not touched. About 1.5 minutes on two CPU cores (97 s measured);
the training log has one line per epoch (the loss of its last iteration).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import time
from pathlib import Path

from monai.bundle import ConfigWorkflow

from monai_nacl.bundle_check import find_bundle

BUNDLE_NAME = "phantom_nacl_segmentation"


def _run(bundle: Path, configs: list[str], override: dict) -> None:
    files = [str(bundle / "configs" / c) for c in configs]
    wf = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type="train",
        bundle_root=str(bundle),
        **override,
    )
    wf.initialize()
    wf.run()
    wf.finalize()


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--resume", action="store_true", help="continue a previous run in --out instead of restarting")
    ap.add_argument(
        "--bundle", type=Path, default=None, help=f"the {BUNDLE_NAME} bundle folder (default: found as described above)"
    )
    args = ap.parse_args(argv)
    if args.epochs < 1:
        ap.error("--epochs must be >= 1")
    if args.bundle is None:
        try:
            bundle = find_bundle(BUNDLE_NAME)
        except FileNotFoundError as e:
            ap.error(str(e))
    elif not (args.bundle / "configs" / "train.json").is_file():
        ap.error(f"--bundle {args.bundle}: no configs/train.json there (give the {BUNDLE_NAME} folder)")
    else:
        bundle = args.bundle.resolve()
    print(f"== bundle {bundle}", flush=True)
    out = args.out.resolve()
    if out.exists() and not args.resume:
        shutil.rmtree(out / "models", ignore_errors=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        shutil.rmtree(out / "eval", ignore_errors=True)
    override = {
        "ckpt_dir": str(out / "models"),
        "resume_dir": str(out / "checkpoints"),
        "output_dir": str(out / "eval"),
        "dataset_dir": str(out / "data"),
        "train#trainer#max_epochs": args.epochs,
        "val_interval": min(5, args.epochs),
    }
    steps = [("train", ["train.json"]), ("calibrate", ["train.json", "calibrate.json"])]
    steps.append(("evaluate", ["train.json", "evaluate.json"]))
    for name, configs in steps:
        t0 = time.perf_counter()
        print(f"== {name} ({' + '.join(configs)})", flush=True)
        _run(bundle, configs, override)
        print(f"== {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    with open(out / "eval" / "metrics.csv") as f:
        metrics = {row[0]: float(row[1]) for row in csv.reader(f) if row}
    print("\nTest phantoms (temperature-scaled NACL model):")
    for key, value in metrics.items():
        print(f"  {key:15s} {value:.4f}")
    print(f"Reliability diagrams and per-case CSVs: {out / 'eval'}")
    return metrics


if __name__ == "__main__":
    main()
