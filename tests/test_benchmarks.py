"""Smoke test of the evidence script's --quick mode on the real Hippocampus data (skips without it)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIPPO_DATA = Path(os.environ.get("MONAI_NACL_HIPPOCAMPUS", ROOT.parent / "shared" / "data" / "hippocampus"))


@pytest.mark.skipif(
    not (HIPPO_DATA / "dataset.json").is_file(),
    reason=f"MSD Task04 Hippocampus not found at {HIPPO_DATA} (set MONAI_NACL_HIPPOCAMPUS)",
)
def test_calibration_hippocampus_quick_mode(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "calibration_hippocampus.py"), "--quick", "--threads", "1"]
    cmd += ["--data-dir", str(HIPPO_DATA), "--out", str(tmp_path / "out"), "--runs", "nacl_patch32_s123", "ce_s1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out_quick"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["run"], r["scaling"]) for r in rows} == {
        (r, t) for r in ("nacl_patch32_s123", "ce_s1") for t in ("T1", "Tfit", "Tfit_fg")
    }
    result_json = json.loads((out / "runs" / "ce_s1" / "result.json").read_text())
    assert result_json["n_test"] == 4 and 0.05 <= result_json["temperature"] <= 20
    for key in ("dice_anterior", "hd95", "ece_fg", "ece_all", "cece_fg", "ace_fg", "mce_fg", "nll_fg", "brier_fg"):
        assert len(result_json["per_case"]["T1"][key]) == 4
    assert (out / "figures" / "ce_s1_Tfit.png").is_file()
    # a rerun skips finished runs and only refreshes the tables
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "30 epochs" not in again.stdout and "[1/2]" not in again.stdout
