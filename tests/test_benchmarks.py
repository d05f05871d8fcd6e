"""Smoke test of the evidence script's --quick mode on the real Hippocampus data (skips without it)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# bundle workflows, torchrun and script runs: minutes in all; `pytest -m "not slow"` skips them
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HIPPO_DATA = Path(os.environ.get("MONAI_NACL_HIPPOCAMPUS", ROOT.parent / "shared" / "data" / "hippocampus"))


@pytest.mark.skipif(
    not (HIPPO_DATA / "dataset.json").is_file(),
    reason=f"MSD Task04 Hippocampus not found at {HIPPO_DATA} (set MONAI_NACL_HIPPOCAMPUS)",
)
def test_calibration_hippocampus_quick_mode(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "calibration_hippocampus.py"), "--quick", "--threads", "1"]
    cmd += ["--data-dir", str(HIPPO_DATA), "--out", str(tmp_path / "out")]
    cmd += ["--runs", "nacl_patch32_s123", "ce_s1", "nacl_mean_s1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out_quick"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["run"], r["scaling"]) for r in rows} == {
        (r, t) for r in ("nacl_patch32_s123", "ce_s1", "nacl_mean_s1") for t in ("T1", "Tfit", "Tfit_fg", "Tfit_near")
    }
    result_json = json.loads((out / "runs" / "ce_s1" / "result.json").read_text())
    assert result_json["n_test"] == 4 and 0.05 <= result_json["temperature"] <= 20
    assert len(result_json["temperature_near"]) == 2
    keys = ("dice_anterior", "hd95", "ece_fg", "ece_all", "cece_fg", "ace_fg", "mce_fg", "nll_fg", "brier_fg")
    for key in (*keys, "aece_fg", "acece_fg", "ace_monai", "mce_monai"):
        assert len(result_json["per_case"]["T1"][key]) == 4
    # CE against NACL of the same seed: paired bootstrap intervals around the mean per-case difference
    boot = json.loads((out / "bootstrap.json").read_text())
    assert {(b["run"], b["scaling"]) for b in boot} == {("ce_s1", t) for t in ("T1", "Tfit", "Tfit_near")}
    for b in boot:
        assert b["lo"] <= b["diff"] <= b["hi"]
    # over seeds: with one shared seed the pooled comparison is the per-seed one
    pooled = json.loads((out / "bootstrap_pooled.json").read_text())
    same_seed = {(b["scaling"], b["metric"]): b["diff"] for b in boot}
    for row in (r for r in pooled if r["method"] == "ce"):
        assert row["seeds"] == [1] and row["diff"] == pytest.approx(same_seed[(row["scaling"], row["metric"])])
    assert "paired bootstrap" in (out / "tables.md").read_text()
    for figure in ("ce_s1_Tfit.png", "ce_s1_T1_adaptive.png", "dice_vs_ece.png", "reliability_methods_T1_fg.png"):
        assert (out / "figures" / figure).is_file(), figure
    assert (out / "figures" / "reliability_methods_Tfit_near_adaptive.png").is_file()
    # a rerun skips finished runs and only refreshes the tables
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "30 epochs" not in again.stdout and "[1/3]" not in again.stdout

    ens = [sys.executable, str(ROOT / "benchmarks" / "ensemble_hippocampus.py"), "--quick", "--threads", "1"]
    ens += ["--data-dir", str(HIPPO_DATA), "--out", str(tmp_path / "out"), "--methods", "ce", "--seeds", "1"]
    result = subprocess.run(ens, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    single = json.loads((out / "ensembles" / "ce_ens" / "result.json").read_text())
    # a one-member ensemble without mirroring is the run itself
    assert single["T1"]["dice_mean"][0] == pytest.approx(result_json["T1"]["dice_mean"][0], abs=1e-6)
    assert single["T1"]["ece_fg"][0] == pytest.approx(result_json["T1"]["ece_fg"][0], abs=1e-5)
    assert "| CE, flip | T1 |" in result.stdout


def test_probability_ensemble_averages_probabilities_and_undoes_flips():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ensemble_hippocampus import ProbabilityEnsemble

    torch.manual_seed(0)
    a, b = torch.nn.Conv3d(1, 3, 1), torch.nn.Conv3d(1, 3, 3, padding=1)
    x = torch.randn(2, 1, 5, 6, 7)
    expected = torch.log((torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2)
    torch.testing.assert_close(ProbabilityEnsemble([a, b])(x), expected)
    # a pointwise network commutes with mirroring, so the mirrored view must land back on the same voxels
    torch.testing.assert_close(ProbabilityEnsemble([a], flip_dims=(2, 4))(x), torch.log_softmax(a(x), 1))
    # a 3x3x3 network does not: the mirrored view is averaged in, flipped back
    mirrored = torch.softmax(torch.flip(b(torch.flip(x, (2,))), (2,)), 1)
    expected = torch.log((torch.softmax(b(x), 1) + mirrored) / 2)
    torch.testing.assert_close(ProbabilityEnsemble([b], flip_dims=(2,))(x), expected)


def test_paired_bootstrap_interval():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from calibration_hippocampus import paired_bootstrap

    a = [0.5, 0.7, 0.9, 0.6, 0.8]
    assert paired_bootstrap(a, [x - 0.1 for x in a]) == pytest.approx([0.1, 0.1, 0.1])  # a constant difference
    diff, lo, hi = paired_bootstrap([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], n=4000, seed=1)
    assert diff == 2.5 and 1.0 <= lo < 2.5 < hi <= 4.0
    assert paired_bootstrap([1.0, float("nan")], [0.0, 1.0]) == pytest.approx([float("nan")] * 3, nan_ok=True)


def _evidence_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import calibration_hippocampus

    return calibration_hippocampus


def test_claim_shares_one_queue_between_workers(tmp_path):
    claim = _evidence_module().claim
    fd = claim(tmp_path)
    assert fd is not None and (tmp_path / "claim").read_text() == str(os.getpid())
    assert claim(tmp_path) is None  # another worker (another open of the file) cannot take it
    # the trainer inherits the claim: with the worker gone (its descriptor closed) the run stays taken
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(fd,))
    try:
        os.close(fd)
        assert claim(tmp_path) is None
    finally:
        trainer.kill()
        trainer.wait()
    # both gone (crashed or finished): free again, whatever the file still says
    again = claim(tmp_path)
    assert again is not None and (tmp_path / "claim").read_text() == str(os.getpid())
    os.close(again)


def test_adaptive_override_resolves_in_the_bundle_config(tmp_path):
    """The class-adaptive override merged into train.json the way `monai.bundle run` merges it: the handler is first
    among the validation handlers and in the resume checkpoint, everything else as the bundle has it."""
    from monai.bundle import ConfigParser

    module = _evidence_module()
    override = module.method_override("nacl_adaptive")
    assert not any(part.isdigit() for key in override for part in key.split("#"))  # named ids only
    (tmp_path / "override.json").write_text(json.dumps(override))
    bundle_train = module.BUNDLE / "configs" / "train.json"
    parser = ConfigParser()
    parser.read_config([str(bundle_train), str(tmp_path / "override.json")])
    original = json.loads(bundle_train.read_text())
    assert parser["validate#handlers"] == ["@validate#adaptive_penalty"] + original["validate"]["handlers"]
    checkpoints = [h for h in parser["train#handlers"] if "ResumableCheckpoint" in str(h)]
    assert checkpoints[0]["save_dict"]["adaptive_penalty"] == "@validate#adaptive_penalty"
    assert len(parser["train#handlers"]) == len(original["train"]["handlers"])
    handler = parser.get_parsed_content("validate#adaptive_penalty", instantiate=True)
    assert type(handler).__name__ == "ClassAdaptivePenalty" and handler.statistic == "penalty"
    assert handler.margin.tolist() == [module.ADAPTIVE_MARGIN["penalty"]] * 3
    ablation = module.method_override("nacl_adaptive_ece")["validate#adaptive_penalty"]
    assert ablation["statistic"] == "class_ece" and ablation["margin"] == module.ADAPTIVE_MARGIN["class_ece"]
    assert parser.get_parsed_content("validate#adaptive_penalty#loss") is parser.get_parsed_content("loss")


def test_pooled_comparison_pairs_seeds_and_cases(tmp_path):
    """Two seeds: differences are paired by seed and case; the interval sees the seeds disagree."""
    module = _evidence_module()
    cases = {"nacl_mean": {1: [0.1, 0.2, 0.3], 2: [0.3, 0.2, 0.1]}, "ce": {1: [0.2, 0.3, 0.4], 2: [0.2, 0.1, 0.0]}}
    for method, by_seed in cases.items():
        for seed, values in by_seed.items():
            run = tmp_path / "runs" / f"{method}_s{seed}"
            run.mkdir(parents=True)
            dice = [0.85 - 0.05 * (method == "ce")] * 3  # CE 0.05 below NACL on every case, every seed
            ids = ["a", "b", "c"]
            if method == "ce" and seed == 2:  # stored in another order: paired by id, not position
                ids, values, dice = ids[::-1], values[::-1], dice[::-1]
            per_case = {"T1": {"ece_fg": values, "dice_mean": dice}}
            (run / "result.json").write_text(json.dumps({"per_case": per_case, "cases": ids}))
    runs = ["nacl_mean_s1", "nacl_mean_s2", "ce_s1", "ce_s2", "ce_s3"]
    all_rows = module.pooled_against_nacl(tmp_path, runs)
    rows = {r["method"]: r for r in all_rows if r["metric"] == "ece_fg"}
    # CE - NACL: seed 1 +0.1 on every case; seed 2 (reordered back to a, b, c: 0.4, 0.3, 0.2... minus NACL)
    assert rows["ce"]["seeds"] == [1, 2] and rows["ce"]["n_cases"] == 3
    assert rows["ce"]["seed_diffs"] == pytest.approx([0.1, -0.1])
    assert rows["ce"]["diff"] == pytest.approx(0.0, abs=1e-12)
    assert rows["ce"]["value"] - rows["ce"]["reference"] == pytest.approx(rows["ce"]["diff"])
    # the seeds disagree by 0.2: a case-only bootstrap of the seed-averaged differences would give [0, 0]
    assert rows["ce"]["lo"] == pytest.approx(-0.1) and rows["ce"]["hi"] == pytest.approx(0.1)
    assert rows["nacl_mean"]["value"] == pytest.approx(0.2) and rows["nacl_mean"]["diff"] == 0.0
    dice = next(r for r in all_rows if r["method"] == "ce" and r["metric"] == "dice_mean")
    assert dice["diff"] == pytest.approx(-0.05) and dice["hi"] == pytest.approx(-0.05)
    text = module.pooled_markdown(all_rows)
    # only the Dice difference, whose interval excludes 0, is bold
    assert "| CE | 2 | 0.8000 (**-0.0500 [-0.0500, -0.0500]**; seeds -0.0500..-0.0500) |" in text
    assert "0.2000 (+0.0000 [-0.1000, +0.1000]; seeds -0.1000..+0.1000) |" in text


def test_pooled_comparison_refuses_unpaired_cases_and_skips_non_finite(tmp_path):
    module = _evidence_module()
    for run, values in {"nacl_mean_s1": [0.1, 0.2, float("nan")], "ce_s1": [0.2, 0.4, 0.5]}.items():
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / "result.json").write_text(json.dumps({"per_case": {"T1": {"nll_fg": values}}}))
    row = next(r for r in module.pooled_against_nacl(tmp_path, ["nacl_mean_s1", "ce_s1"]) if r["method"] == "ce")
    assert row["n_cases"] == 2 and row["diff"] == pytest.approx(0.15)  # the NaN case left out of both
    (tmp_path / "runs" / "ce_s1" / "result.json").write_text(json.dumps({"per_case": {"T1": {"nll_fg": [0.2]}}}))
    with pytest.raises(ValueError, match="cannot pair"):
        module.pooled_against_nacl(tmp_path, ["nacl_mean_s1", "ce_s1"])
    with pytest.raises(ValueError, match="same cases"):
        module.paired_bootstrap([0.1, 0.2], [0.1, 0.2, 0.3])


def test_seeds_and_cases_bootstrap_with_one_seed_is_the_case_bootstrap():
    module = _evidence_module()
    a, b = [0.5, 0.7, 0.9, 0.6, 0.8], [0.45, 0.72, 0.8, 0.5, 0.81]
    diff = torch.tensor([a], dtype=torch.float64) - torch.tensor([b], dtype=torch.float64)
    two_level = module.seeds_and_cases_bootstrap(diff, n=4000, seed=3)
    case_only = module.paired_bootstrap(a, b, n=4000, seed=3)
    assert two_level == case_only  # one code path: the per-run tables and the pooled one cannot drift apart
    assert two_level[1] < two_level[0] < two_level[2]


def test_adaptive_rounds_are_read_from_the_training_log(tmp_path):
    """The multiplier rounds as ClassAdaptivePenalty logs them; a resumed run's repeated round keeps its last entry."""
    module = _evidence_module()
    prefix = "2026-11-29 01:03:10,513 - monai_nacl.handlers.adaptive_penalty - INFO - ClassAdaptivePenalty round"
    log = tmp_path / "train.log"
    log.write_text(
        f"{prefix} 1 (penalty): statistic [3.5, 1.7, 1.8], margin [2.05, 2.05, 2.05] -> penalty_weight [0.17, 0.08, 0.09]\n"
        "2026-11-29 01:03:10,513 - INFO - Epoch[5] Metrics -- adaptive_penalty_lambda_0: 0.1691\n"
        f"{prefix} 2 (penalty): statistic [3.0, 1.8, 1.8], margin [2.05, 2.05, 2.05] -> penalty_weight [0.2, 0.07, 0.07]\n"
        f"{prefix} 2 (penalty): statistic [3.1, 1.8, 1.8], margin [2.05, 2.05, 2.05] -> penalty_weight [0.21, 0.07, 0.07]\n"
    )
    rounds = module.adaptive_rounds(log)
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0] == {
        "round": 1,
        "statistic_name": "penalty",
        "statistic": [3.5, 1.7, 1.8],
        "margin": [2.05, 2.05, 2.05],
        "weight": [0.17, 0.08, 0.09],
    }
    assert rounds[1]["weight"] == [0.21, 0.07, 0.07]  # the resumed run's entry
    module._adaptive_figure(tmp_path, [])  # no class-adaptive run: nothing drawn, no error
    assert not (tmp_path / "figures" / "adaptive_rounds.png").exists()
