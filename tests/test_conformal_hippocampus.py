"""Smoke test of benchmarks/conformal_hippocampus.py on 3 + 3 real Hippocampus cases (skips without the data)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import HIPPOCAMPUS

# runs the shipped network on real volumes; `pytest -m "not slow"` skips it
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _number(value) -> float:
    return float(value)  # "inf" (written for infinite thresholds and widths) included


@pytest.mark.skipif(
    not (HIPPOCAMPUS / "dataset.json").is_file(),
    reason=f"MSD Task04 Hippocampus not found at {HIPPOCAMPUS} (set MONAI_NACL_HIPPOCAMPUS)",
)
def test_conformal_hippocampus_quick(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import conformal_hippocampus
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    conformal_hippocampus.main(["--quick", "3", "--data", str(HIPPOCAMPUS), "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert (tmp_path / "out" / "tables.md").read_text().startswith("### Voxel prediction sets")
    assert result["model"] == "model.pt" and result["n_calibration"] == 3 and result["n_test"] == 3
    assert len(result["temperature"]) == 2 and all(0.05 <= t <= 20 for t in result["temperature"])
    assert set(result["scalings"]) == {"calibrated", "T1"}
    for key in ("calibrated", "T1"):
        assert set(result[key]) == {"0.1", "0.05"}
        for alpha, fitted in result[key].items():
            sets = fitted["sets"]
            assert sets["n_cases"] == 3 and sets["n_scores"] > 3
            for k in ("coverage", "coverage_foreground", "fallback_fraction", "multi_fraction"):
                assert 0.0 <= sets[k] <= 1.0
            # the rank counts cases: 3 are too few for alpha 0.1 (n < 1/alpha - 1), every set holds every class
            assert math.isinf(_number(sets["threshold"])) and sets["coverage"] == 1.0
            assert sets["mean_set_size"] == 3.0 and sets["fallback_fraction"] == 0.0
            assert set(fitted["structures"]) == {"anterior", "posterior"}
            for s in fitted["structures"].values():
                for k in ("outer_fnr", "inner_fpv", "argmax_fnr", "argmax_fpv", "volume_coverage"):
                    assert 0.0 <= s[k] <= 1.0, (key, alpha, k, s[k])
                assert s["outer_growth_voxels"] >= 0 and s["inner_shrink_voxels"] >= 0
                assert _number(s["volume_width_ml"]) >= 0 and _number(s["volume_quantile"]) >= 0
                assert 0.0 <= s["t_out"] <= 1.0 and _number(s["t_in"]) >= 0
                # 3 calibration cases are too few for alpha 0.1 (n < 1/alpha - 1): the safe masks and intervals
                assert s["n_calibration"] == 3 and s["t_out"] == 0.0 and s["outer_fnr"] == 0.0
                assert math.isinf(_number(s["t_in"])) and s["inner_fpv"] == 0.0
                assert math.isinf(_number(s["volume_width_ml"])) and s["volume_coverage"] == 1.0
    for alpha, k in (("0.1", 1.645), ("0.05", 1.96)):
        naive = result["naive"][alpha]
        assert naive["k"] == k
        for name in ("anterior", "posterior"):
            assert 0.0 <= naive[name]["coverage"] <= 1.0
            assert naive[name]["width_ml"] >= 0 and naive[name]["sigma_ml"] >= 0
    assert result["seconds"]["total"] > 0
    # the figure and the record of the shipped weights (checked against the copy of the weights beside it)
    from monai_nacl.conformal import check_conformal_record, load_conformal, read_conformal_record

    assert (tmp_path / "out" / "conformal_masks.png").stat().st_size > 10_000
    weights = tmp_path / "out" / "model.pt"
    assert check_conformal_record(weights) == []
    record = read_conformal_record(weights)
    assert record["alphas"] == [0.1, 0.05] and record["cases"] == 3
    assert record["temperature"] == pytest.approx(result["temperature"])
    crc = load_conformal(weights, "risk_control", 0.1)
    assert crc.n == [3, 3, 3] and math.isinf(float(crc.inner_threshold[1]))
    assert math.isinf(float(load_conformal(weights, "volume_intervals", 0.05).quantile[1]))
