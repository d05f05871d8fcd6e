"""Run MONAI Label's ``BundleInferTask`` on this project's bundles (a manual check, not part of CI).

MONAI Label 0.8.5 lives in its own environment; see docs/monai_label.md for how that environment is built and
what this script printed. Where torchvision cannot be imported, the ``monailabel_nacl`` app's stand-in
(``apps/monailabel_nacl/compat``) is used, as the app itself does. Usage::

    /work/mlvenv/bin/python tools/try_monailabel.py --hippocampus ../shared/data/hippocampus

The running server (``apps/monailabel_nacl``) is checked by ``tools/monailabel_server_check.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's monai_nacl
try:
    import torchvision.utils  # noqa: F401  (MONAI Label imports it at module level)
except Exception:
    for _name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[_name]
    sys.path.insert(0, str(REPO / "apps" / "monailabel_nacl" / "compat"))

from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402

from monai_nacl.data import build_datalist, write_fixture  # noqa: E402


def infer(bundle: Path, image: str, label: str) -> bool:
    try:
        result = BundleInferTask(str(bundle), conf={})({"image": image, "device": "cpu"})
        seg = nib.load(result[0] if isinstance(result, tuple) else result)
        src = nib.load(image)
        same = seg.shape[:3] == src.shape[:3] and np.allclose(seg.affine, src.affine, atol=1e-4)
        values = sorted(np.unique(np.asarray(seg.dataobj)).astype(int).tolist())
        print(f"OK   {label}: shape {seg.shape}, labels {values}, original geometry: {same}")
        return True
    except Exception as e:  # report and go on with the next bundle
        print(f"FAIL {label}: {type(e).__name__}: {e}")
        traceback.print_exc(limit=-2)
        return False


def with_untrained_weights(name: str, work: Path, replace: tuple[str, str] | None = None) -> Path:
    bundle = work / name
    shutil.copytree(REPO / "bundles" / name, bundle, ignore=shutil.ignore_patterns("eval"))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    if replace:
        cfg = bundle / "configs" / "inference.json"
        cfg.write_text(cfg.read_text().replace(*replace))
    return bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hippocampus", type=Path, default=REPO.parent / "shared" / "data" / "hippocampus")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    hippo = REPO / "bundles" / "hippocampus_mri_nacl_segmentation"
    if (args.hippocampus / "dataset.json").is_file():
        case = json.loads((hippo / "configs" / "datalist.json").read_text())["test"][0]["image"]
        infer(hippo, str((args.hippocampus / case).resolve()), "hippocampus, shipped weights, real test case")
    data = write_fixture("msd", work / "prostate_data", num_cases=3)
    image = build_datalist("msd", data)["training"][0]["image"]
    name = "prostate_mri_nacl_segmentation"
    infer(with_untrained_weights(name, work / "safe"), image, "prostate (SafeSpacingd), fixture, untrained")
    plain = with_untrained_weights(name, work / "plain", ("monai_nacl.transforms.SafeSpacingd", "Spacingd"))
    infer(plain, image, "prostate with MONAI's Spacingd instead, fixture, untrained")


if __name__ == "__main__":
    main()
