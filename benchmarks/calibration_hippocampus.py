"""NACL against every baseline on MSD Task04 Hippocampus, with temperature scaling and NACL ablations.

Every method is trained by the Hippocampus bundle's own ``train.json`` (same network, split, patch, augmentation,
optimiser, schedule and seed handling); a method only overrides the loss and, for methods without a precomputed
prior, swaps the prior transform for a no-op (exactly as the bundle's ``train_dice_ce.json``). Then, in this
process, the best checkpoint (validation Dice) is evaluated on the test split at T = 1 and at temperatures
fitted on the validation split by NLL: over all voxels (``Tfit``), over ground-truth foreground voxels only
(``Tfit_fg``, the voxels of the paper's ECE protocol), and two temperatures, one for the voxels near the predicted
foreground and one for the rest (``Tfit_near``, what the Hippocampus bundle ships).

The work is a queue of runs; each run keeps its checkpoints (training resumes from the last finished epoch), writes
``trained.json`` after training and ``result.json`` after evaluation, so a killed job loses at most one epoch. Rerunning skips finished runs and
refreshes the tables.

Usage::

    python benchmarks/calibration_hippocampus.py --quick                 # minutes: smoke test on 16 cases
    nohup python benchmarks/calibration_hippocampus.py > calib.log 2>&1 &  # full: hours on CPU
    python benchmarks/calibration_hippocampus.py --runs nacl_mean_s123 dice_ce_s123   # a subset
    python benchmarks/calibration_hippocampus.py --report-only           # tables from finished runs
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "hippocampus_mri_nacl_segmentation"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus"
PUBLISH_DIR = REPO / "docs" / "results"
PUBLISH_FIGURES = REPO / "docs" / "figures" / "results" / "protocol2"
CLASS_NAMES = ("background", "anterior", "posterior")
SEEDS = (123, 1, 2)
NEAR_MARGIN = 1  # voxels around the predicted foreground that get their own temperature (as the bundle)
SCALINGS = {
    "T1": "T = 1",
    "Tfit": "T fitted on all voxels",
    "Tfit_fg": "T fitted on foreground",
    "Tfit_near": "two T: near the predicted foreground / elsewhere",
}

# train.json's named pieces of the prior pipeline (as train_dice_ce.json overrides them)
NO_PRIOR = {
    "train#use_prior": False,
    "train#prior_transform": {"_target_": "Identityd", "keys": "label"},
    "train#spatial_keys": ["image", "label"],
    "train#spatial_modes": ["bilinear", "nearest"],
    "train#spatial_padding": ["zeros", "zeros"],
}


CROP32 = {"patch_size": [32, 32, 32]}


def _loss(target: str, **kwargs) -> dict:
    return {"loss": {"_target_": f"monai_nacl.losses.{target}", "num_classes": "@num_classes", **kwargs}}


def _nacl(**kwargs) -> dict:
    options = {"base": "dice_ce", "alpha": 0.1, "kernel": "mean", "kernel_size": 3, **kwargs}
    return _loss("NACLLoss", **options)


# name -> (description, config override). NACL variants keep the bundle's prior transform, which reads the
# loss's kernel options, so their override is the loss alone.
METHODS: dict[str, tuple[str, dict]] = {
    "dice_ce": ("CE+Dice", {**NO_PRIOR, **_loss("DiceCELoss")}),
    "ce": ("CE", {**NO_PRIOR, **_loss("CrossEntropyLoss")}),
    "focal": ("Focal (gamma 3)", {**NO_PRIOR, **_loss("FocalLoss", gamma=3.0)}),
    "ls": ("Label smoothing (0.1)", {**NO_PRIOR, **_loss("LabelSmoothingLoss", epsilon=0.1)}),
    "ecp": ("ECP (beta 0.1)", {**NO_PRIOR, **_loss("ECPLoss", beta=0.1)}),
    "mbls": ("MbLS (m 10, lambda 0.1)", {**NO_PRIOR, **_loss("MbLSLoss", margin=10.0, lambda_margin=0.1)}),
    "svls": ("SVLS (3^3, sigma 1)", {**NO_PRIOR, **_loss("SVLSLoss", kernel_size=3, sigma=1.0)}),
    "l1ace_hard": ("Dice+CE + hard mL1-ACE", {**NO_PRIOR, **_loss("HardL1ACELoss", base="dice_ce")}),
    "l1ace_soft": ("Dice+CE + soft mL1-ACE", {**NO_PRIOR, **_loss("SoftL1ACELoss", base="dice_ce", empty_weight=0.01)}),
    "nacl_mean": ("NACL mean prior (bundle)", _nacl()),
    "nacl_ce": ("NACL CE base (paper)", _nacl(base="ce")),
    "nacl_gauss": ("NACL gaussian prior", _nacl(kernel="gaussian")),
    "nacl_a0.01": ("NACL alpha 0.01", _nacl(alpha=0.01)),
    "nacl_a0.5": ("NACL alpha 0.5", _nacl(alpha=0.5)),
    "nacl_k5": ("NACL kernel 5", _nacl(kernel_size=5)),
    "nacl_softmax": ("NACL penalty on softmax", _nacl(penalty_on="softmax")),
    "nacl_adaptive": ("Class-adaptive NACL (augmented Lagrangian)", {}),  # override: adaptive_override()
    "nacl_adaptive_ece": ("Class-adaptive NACL, class-ECE constraint", {}),
    # Prior ablation: whole-volume training makes "prior from the volume" and "prior from the patch" the same
    # input, so both arms train on 32^3 crops that cut through the hippocampus.
    "nacl_crop32": ("NACL 32^3 crops, prior from the volume", {**CROP32, **_nacl()}),
    "nacl_patch32": ("NACL 32^3 crops, prior from the patch", {**CROP32, **NO_PRIOR, **_nacl()}),
}

# The protocol: every method at every seed (seed-major, so the first seed of every method lands first), then the
# NACL ablations at seed 123.
PROTOCOL_METHODS = (
    "nacl_mean", "dice_ce", "ce", "l1ace_hard", "l1ace_soft", "mbls", "ecp", "svls", "focal", "ls", "nacl_ce",
    "nacl_adaptive",
)  # fmt: skip
ABLATIONS = (
    "nacl_adaptive_ece", "nacl_gauss", "nacl_a0.01", "nacl_a0.5", "nacl_k5", "nacl_softmax", "nacl_crop32", "nacl_patch32",
)  # fmt: skip
DEFAULT_RUNS = [f"{m}_s{s}" for s in SEEDS for m in PROTOCOL_METHODS] + [f"{m}_s123" for m in ABLATIONS]

METRIC_KEYS = ("dice_anterior", "dice_posterior", "dice_mean", "hd95") + tuple(
    f"{k}_{m}" for m in ("fg", "all") for k in ("ece", "cece", "ace", "mce", "nll", "brier")
)
# equal-mass (adaptive) ECEs on the foreground, and MONAI's class-wise ACE/MCE (CalibrationErrorMetric, 20 bins,
# background excluded, every voxel) as Barfoot et al. report them
NEW_KEYS = ("aece_fg", "acece_fg", "ace_monai", "mce_monai")
METRIC_KEYS += NEW_KEYS
# paired per-case bootstrap of each method against NACL (same seed): these metrics, 95 % intervals
BOOTSTRAP_KEYS = ("dice_mean", "ece_fg", "cece_fg", "ace_monai", "nll_fg")


# Class-adaptive NACL: NACL (alpha 0.1 as the start of every class's weight) plus ClassAdaptivePenalty after each
# validation round (every 5 epochs). The constraint holds each class's own penalty term, the mean |tau_c - logit_c|
# over the validation voxels, below a common margin, as the class-adaptive constraints of CRaC (Murugesan et al.,
# MICCAI 2024) do: a class whose logits stray further from its neighbour prior than the margin gets a stronger pull,
# the others relax. A larger weight lowers that class's penalty, so the multiplier update moves the statistic the
# way the augmented Lagrangian assumes. ADAPTIVE_MARGIN is the mean over the three classes of the statistic for the
# NACL run of seed 123 (its best checkpoint, `--adaptive-pilot nacl_mean_s123`), and rho moves lambda by 0.1 for a
# violation of one margin.
# "nacl_adaptive_ece" is the first design, kept as an ablation: it constrained each class's one-vs-rest ECE over all
# validation voxels (margin 0.0016, half the foreground classes' mean for nacl_mean_s123: [0.0058, 0.0033, 0.0031]).
# That ECE grew as the weights grew (the background became under-confident), so every weight ran to the cap.
# `--adaptive-pilot nacl_mean_s123`: penalty [5.424, 0.364, 0.372] (background, anterior, posterior), mean 2.053
ADAPTIVE_MARGIN = {"penalty": 2.05, "class_ece": 0.0016}
ADAPTIVE_STATISTIC = {"nacl_adaptive": "penalty", "nacl_adaptive_ece": "class_ece"}
ADAPTIVE_START_WEIGHT = _nacl()["loss"]["alpha"]  # every class's weight before the first round


def adaptive_settings(method: str) -> dict:
    """ClassAdaptivePenalty arguments of a class-adaptive method."""
    statistic = ADAPTIVE_STATISTIC[method]
    margin = ADAPTIVE_MARGIN[statistic]
    return {"statistic": statistic, "margin": margin, "rho": 0.1 / margin, "lambda_min": 0.0, "lambda_max": 0.5}


def adaptive_override(method: str = "nacl_adaptive") -> dict:
    """train.json override for class-adaptive NACL: the handler first in ``validate#handlers`` and in the resume
    checkpoint (found by type, so the override never addresses a list position)."""
    config = json.loads((BUNDLE / "configs" / "train.json").read_text())
    handler = {"_target_": "monai_nacl.handlers.ClassAdaptivePenalty", "loss": "@loss", **adaptive_settings(method)}
    handler["output_transform"] = "$monai.handlers.from_engine(['logits', 'label_index'])"
    train_handlers = json.loads(json.dumps(config["train"]["handlers"]))
    checkpoints = [h for h in train_handlers if isinstance(h, dict) and h["_target_"].endswith("ResumableCheckpoint")]
    if len(checkpoints) != 1:
        raise RuntimeError(f"expected one ResumableCheckpoint in train#handlers of {BUNDLE}, got {len(checkpoints)}")
    checkpoints[0]["save_dict"]["adaptive_penalty"] = "@validate#adaptive_penalty"
    override = {**_nacl(), "validate#adaptive_penalty": handler, "train#handlers": train_handlers}
    override["validate#handlers"] = ["@validate#adaptive_penalty"] + config["validate"]["handlers"]
    return override


def method_override(method: str) -> dict:
    return adaptive_override(method) if method in ADAPTIVE_STATISTIC else dict(METHODS[method][1])


def claim(run_dir: Path) -> int | None:
    """Take ``run_dir`` for this process, so several workers can share one queue: an exclusive ``flock`` on its
    ``claim`` file, or ``None`` when another process holds it. The lock lives as long as the returned descriptor is
    open in any process (the trainer inherits it), so a killed worker whose trainer still runs keeps its run, and a
    run is free again as soon as both are gone; no stale-pid logic."""
    import fcntl

    fd = os.open(run_dir / "claim", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())  # for people reading the folder
    return fd


def _write_atomic(path: Path, text: str) -> None:
    """Readers (the other worker's report) never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_run(run: str) -> tuple[str, int]:
    method, _, seed = run.rpartition("_s")
    if method not in METHODS or not seed.isdigit():
        raise SystemExit(f"unknown run {run!r}: expected <method>_s<seed> with method in {sorted(METHODS)}")
    return method, int(seed)


def quick_datalist(out: Path) -> Path:
    """The bundle's split cut to 8 / 4 / 4 cases."""
    full = json.loads((BUNDLE / "configs" / "datalist.json").read_text())
    small = {"training": full["training"][:8], "validation": full["validation"][:4], "test": full["test"][:4]}
    path = out / "datalist_quick.json"
    path.write_text(json.dumps(small, indent=4))
    return path


def train(
    run_dir: Path, method: str, seed: int, args: argparse.Namespace, datalist: Path | None, claim_fd: int | None = None
) -> None:
    override = method_override(method)
    override["seed"] = seed
    override["train#trainer#max_epochs"] = args.epochs
    override["val_interval"] = args.val_interval
    if datalist is not None:
        override["datalist#datalist_file"] = str(datalist)
    (run_dir / "override.json").write_text(json.dumps(override, indent=4))
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str([str(BUNDLE / "configs" / "train.json"), str(run_dir / "override.json")]),
        "--bundle_root", str(BUNDLE), "--dataset_dir", str(args.data_dir),
        "--ckpt_dir", str(run_dir / "models"), "--output_dir", str(run_dir / "tb"),
        "--resume_dir", str(run_dir / "checkpoints"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with open(run_dir / "train.log", "a") as log:
        fds = () if claim_fd is None else (claim_fd,)  # the trainer holds the run's claim too
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=BUNDLE, pass_fds=fds)
    if proc.returncode != 0 or not (run_dir / "models" / "model.pt").is_file():
        raise RuntimeError(f"training {run_dir.name} failed (exit {proc.returncode}); see {run_dir / 'train.log'}")


def _bundle_parts(args: argparse.Namespace, datalist: Path | None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(args.data_dir), "device": "$torch.device('cpu')"})
    if datalist is not None:
        parser["datalist#datalist_file"] = str(datalist)
    datalist_ = parser.get_parsed_content("datalist")
    return parser, datalist_


def load_network(parser, run_dir: Path) -> torch.nn.Module:
    """The run's best checkpoint in the bundle's network, at T = 1 (even if a fitted T was stored), eval mode."""
    network = parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(torch.load(run_dir / "models" / "model.pt", weights_only=True, map_location="cpu"))
    network.set_temperature(1.0)
    return network.eval()


def _logits(network, inferer, data):
    with torch.no_grad():
        for item in data:
            yield item, inferer(item["image"][None], network).float()


def evaluate(
    run_dir: Path, args: argparse.Namespace, datalist: Path | None, network: torch.nn.Module | None = None
) -> dict:
    """Test metrics at T = 1 and at the T fitted on the validation split; reliability statistics saved.

    ``network`` (default: the run's best checkpoint in the bundle's network) must return logits, or
    log-probabilities, which a temperature scales the same way."""
    from monai.data import Dataset
    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    from monai_nacl.metrics import CalibrationMetric, monai_calibration_errors
    from monai_nacl.temperature import TemperatureFitter, apply_temperature

    parser, datalist_ = _bundle_parts(args, datalist)
    if network is None:
        network = load_network(parser, run_dir)
    inferer = parser.get_parsed_content("validate#inferer")
    preprocessing = parser.get_parsed_content("validate#preprocessing")

    fitters = {m: TemperatureFitter(len(CLASS_NAMES), mask=m) for m in ("all", "foreground")}
    fitters["near"] = TemperatureFitter(len(CLASS_NAMES), foreground_margin=NEAR_MARGIN)
    for item, logits in _logits(network, inferer, Dataset(datalist_["validation"], preprocessing)):
        for fitter in fitters.values():
            fitter.update(logits, item["label"][None])
    scales = {"T1": 1.0, "Tfit": float(fitters["all"].fit()), "Tfit_fg": float(fitters["foreground"].fit())}
    scales["Tfit_near"] = fitters["near"].fit().tolist()  # [elsewhere, near the predicted foreground]

    def scaled(logits: torch.Tensor, t: float | list[float]) -> torch.Tensor:
        return apply_temperature(logits, torch.tensor(t), NEAR_MARGIN if isinstance(t, list) else None)

    metrics = {
        (t, m): CalibrationMetric(len(CLASS_NAMES), mask=m, per_volume=True)
        for t in scales
        for m in ("foreground", "all")
    }
    adaptive = {
        t: CalibrationMetric(len(CLASS_NAMES), mask="foreground", per_volume=True, binning="adaptive") for t in scales
    }
    monai_errors: dict[str, dict[str, list[float]]] = {t: {"ace_monai": [], "mce_monai": []} for t in scales}
    dice, hd95 = [], []
    for item, logits in _logits(network, inferer, Dataset(datalist_["test"], preprocessing)):
        label = item["label"][None].long()
        for t, scale in scales.items():
            probs = torch.softmax(scaled(logits, scale), 1)
            for m in ("foreground", "all"):
                metrics[(t, m)].update(probs, label)
            adaptive[t].update(probs, label)
            errors = monai_calibration_errors(probs, label, len(CLASS_NAMES))
            monai_errors[t]["ace_monai"].append(errors["ace"])
            monai_errors[t]["mce_monai"].append(errors["mce"])
        pred = one_hot(logits.argmax(1, keepdim=True), len(CLASS_NAMES))
        gt = one_hot(label, len(CLASS_NAMES))
        dice.append(compute_dice(pred, gt, include_background=False)[0].tolist())
        hd95.append(float(compute_hausdorff_distance(pred, gt, include_background=False, percentile=95).mean()))

    result: dict = {"temperature": scales["Tfit"], "temperature_fg": scales["Tfit_fg"], "n_test": len(dice)}
    result["cases"] = [Path(d["image"]).name for d in datalist_["test"]]  # the order of every per_case list
    result["temperature_near"] = scales["Tfit_near"]
    result["per_case"] = {}
    for t in scales:
        cases = {"dice_anterior": [d[0] for d in dice], "dice_posterior": [d[1] for d in dice]}
        cases["dice_mean"] = [(a + b) / 2 for a, b in dice]
        cases["hd95"] = hd95
        for m, tag in (("foreground", "fg"), ("all", "all")):
            for k in ("ece", "cece", "ace", "mce", "nll", "brier"):
                cases[f"{k}_{tag}"] = [v[k] for v in metrics[(t, m)].get_per_volume()]
            stats = metrics[(t, m)].bin_statistics()
            torch.save({"top": stats.top, "ovr": stats.ovr, "scalars": stats.scalars}, run_dir / f"bins_{t}_{tag}.pt")
        stats = adaptive[t].bin_statistics()
        torch.save({"top": stats.top, "ovr": stats.ovr, "scalars": stats.scalars}, run_dir / f"bins_{t}_adaptive.pt")
        volumes = adaptive[t].get_per_volume()
        cases["aece_fg"], cases["acece_fg"] = [v["ece"] for v in volumes], [v["cece"] for v in volumes]
        cases.update(monai_errors[t])
        result[t] = {k: _mean_std(v) for k, v in cases.items()}
        result["per_case"][t] = cases
    return result


def adaptive_pilot(run_dir: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """The statistics class-adaptive NACL can constrain, measured on the validation split with a finished run's best
    checkpoint, per class: ``{statistic: [s_c]}`` for ``"penalty"`` and ``"class_ece"`` (as ``ClassAdaptivePenalty``
    computes them during training)."""
    from monai.data import Dataset

    from monai_nacl.handlers import ClassAdaptivePenalty

    parser, datalist_ = _bundle_parts(args, None)
    network = load_network(parser, run_dir)
    loss = parser.get_parsed_content("loss", instantiate=True)
    handlers = {s: ClassAdaptivePenalty(loss, margin=0.0, rho=1e-9, statistic=s) for s in ADAPTIVE_MARGIN}
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    inferer = parser.get_parsed_content("validate#inferer")
    for item, logits in _logits(network, inferer, Dataset(datalist_["validation"], preprocessing)):
        for handler in handlers.values():
            handler.update(logits, item["label"][None])
    return {s: handler.compute().tolist() for s, handler in handlers.items()}


def _mean_std(values: list[float]) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [float("nan"), float("nan")]
    return [statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0]


def report(out: Path, runs: list[str]) -> None:
    """results.csv / results.json over finished runs, a markdown table on stdout."""
    rows = []
    for run in runs:
        path = out / "runs" / run / "result.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        method, seed = parse_run(run)
        temperatures = {"T1": 1.0, "Tfit": result["temperature"], "Tfit_fg": result.get("temperature_fg")}
        temperatures["Tfit_near"] = result.get("temperature_near")
        for t in SCALINGS:
            if t not in result:  # evaluated before this scaling existed: rerun with --reevaluate
                continue
            temperature = temperatures[t]
            row = {"run": run, "method": method, "seed": seed, "scaling": t, "temperature": temperature}
            row["train_minutes"] = result.get("train_minutes", float("nan"))
            row["resumed"] = bool(result.get("resumed", False))
            for k in METRIC_KEYS:
                # runs evaluated before a metric existed: nan (rerun with --reevaluate)
                row[k], row[f"{k}_std"] = result[t].get(k, [float("nan"), float("nan")])
            rows.append(row)
    if not rows:
        print("no finished runs yet")
        return
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(out / "results.csv", table.getvalue())
    _write_atomic(out / "results.json", json.dumps(rows, indent=1))
    _figures(out, sorted({r["run"] for r in rows}))
    _summary_figures(out, rows)
    _adaptive_figure(out, sorted({r["run"] for r in rows}))
    comparisons = bootstrap_against_nacl(out, runs)
    _write_atomic(out / "bootstrap.json", json.dumps(comparisons, indent=1))
    pooled = pooled_against_nacl(out, runs)
    _write_atomic(out / "bootstrap_pooled.json", json.dumps(pooled, indent=1))
    text = pooled_markdown(pooled) + markdown(rows) + bootstrap_markdown(comparisons)
    _write_atomic(out / "tables.md", text)
    print(text)


def paired_bootstrap(a: list[float], b: list[float], n: int = 10_000, seed: int = 0) -> list[float]:
    """Mean of the per-case differences ``a - b`` and its 95 % percentile bootstrap interval (cases resampled
    in pairs, so the shared per-case difficulty cancels); cases where either value is not finite are dropped. The
    one-seed case of :func:`seeds_and_cases_bootstrap`."""
    if len(a) != len(b):
        raise ValueError(f"paired bootstrap needs the same cases: {len(a)} values against {len(b)}")
    pairs = torch.tensor([(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)], dtype=torch.float64)
    if len(pairs) < 2:
        return [float("nan")] * 3
    return seeds_and_cases_bootstrap((pairs[:, 0] - pairs[:, 1])[None], n, seed)


def bootstrap_against_nacl(out: Path, runs: list[str]) -> list[dict]:
    """Each finished run against the NACL (Dice+CE base) run of the same seed, per scaling and metric."""
    results = _finished(out, runs)
    rows = []
    for run, result in results.items():
        method, seed = parse_run(run)
        reference = results.get(f"nacl_mean_s{seed}")
        if method == "nacl_mean" or reference is None or "per_case" not in result or "per_case" not in reference:
            continue
        for t in ("T1", "Tfit", "Tfit_near"):
            a, b = result["per_case"].get(t), reference["per_case"].get(t)
            if a is None or b is None:
                continue
            for key in BOOTSTRAP_KEYS:
                if key in a and key in b:
                    diff, lo, hi = paired_bootstrap(a[key], b[key])
                    rows.append({"run": run, "scaling": t, "metric": key, "diff": diff, "lo": lo, "hi": hi})
    return rows


def _finished(out: Path, runs: list[str]) -> dict[str, dict]:
    results = {}
    for run in runs:
        path = out / "runs" / run / "result.json"
        if path.is_file():
            results[run] = json.loads(path.read_text())
    return results


def seeds_and_cases_bootstrap(diff: torch.Tensor, n: int = 10_000, seed: int = 0) -> list[float]:
    """Mean of a ``seeds x cases`` matrix of paired differences and its 95 % percentile interval from a two-level
    bootstrap: each replicate draws the seeds with replacement, then the cases with replacement (the same cases for
    every drawn seed, so per-case difficulty still cancels in the pairing), and averages. Training-seed variation
    and case variation both widen the interval; with one seed it is the paired case bootstrap. With 3 seeds the
    seed level is coarse (27 draws), so the interval is a rough guide, not an exact coverage statement."""
    k, m = diff.shape
    g = torch.Generator().manual_seed(seed)
    s_idx = torch.randint(k, (n, k), generator=g)
    c_idx = torch.randint(m, (n, m), generator=g)
    # replicate r: mean over drawn seeds i and drawn cases j of diff[s_idx[r, i], c_idx[r, j]]
    per_seed = diff[s_idx]  # n, k, m
    means = per_seed.gather(2, c_idx[:, None, :].expand(n, k, m)).mean((1, 2))
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [float(diff.mean()), lo, hi]


def pooled_against_nacl(out: Path, runs: list[str]) -> list[dict]:
    """Each method against NACL (Dice+CE base) over the seeds both have: the ``seeds x cases`` matrix of paired
    per-case differences (method minus NACL, same seed, same test case) and a two-level bootstrap interval over
    seeds and cases (:func:`seeds_and_cases_bootstrap`). Cases are paired by their test-case id when the results
    hold them (by position otherwise, checked to have the same count); a case enters only where it is finite for
    every seed of both. ``value`` and ``reference`` are the two means over those seeds and cases (so
    ``value - reference == diff``); ``seed_diffs`` are the per-seed mean differences."""
    per: dict[str, dict[int, dict]] = {}
    for run, result in _finished(out, runs).items():
        if "per_case" in result:
            method, seed = parse_run(run)
            per.setdefault(method, {})[seed] = result
    reference = per.get("nacl_mean", {})
    rows = []
    for method, by_seed in per.items():
        seeds = sorted(s for s in by_seed if s in reference)
        if not seeds:
            continue
        for t in ("T1", "Tfit", "Tfit_near"):
            for key in BOOTSTRAP_KEYS:
                pair = _paired_cases(by_seed, reference, seeds, t, key)
                if pair is None:
                    continue
                a, b = pair
                row = {"method": method, "scaling": t, "metric": key, "seeds": seeds, "n_cases": a.shape[1]}
                row["value"], row["reference"] = float(a.mean()), float(b.mean())
                row["seed_diffs"] = (a - b).mean(1).tolist()
                if method == "nacl_mean":
                    row["diff"] = row["lo"] = row["hi"] = 0.0
                else:
                    row["diff"], row["lo"], row["hi"] = seeds_and_cases_bootstrap(a - b)
                rows.append(row)
    return rows


def _paired_cases(by_seed: dict, reference: dict, seeds: list[int], t: str, key: str):
    """``seeds x cases`` float64 matrices of a method and NACL on the same cases, or None when there is nothing to
    pair (a missing scaling or metric, or no case finite everywhere)."""
    a_rows, b_rows = [], []
    for s in seeds:
        mine, ref = by_seed[s], reference[s]
        x, y = mine["per_case"].get(t, {}).get(key), ref["per_case"].get(t, {}).get(key)
        if x is None or y is None:
            return None
        ids_x, ids_y = mine.get("cases"), ref.get("cases")
        if ids_x is not None and ids_y is not None:
            order = {c: i for i, c in enumerate(ids_x)}
            if set(order) != set(ids_y):
                raise ValueError(f"{key}, seed {s}: the method and NACL were evaluated on different test cases")
            x = [x[order[c]] for c in ids_y]
        elif len(x) != len(y):
            raise ValueError(f"{key}, seed {s}: {len(x)} test cases against NACL's {len(y)}; cannot pair them")
        a_rows.append(x)
        b_rows.append(y)
    if len({len(r) for r in a_rows}) != 1:
        raise ValueError(f"{key}: the seeds were evaluated on different numbers of test cases")
    a, b = torch.tensor(a_rows, dtype=torch.float64), torch.tensor(b_rows, dtype=torch.float64)
    keep = (a.isfinite() & b.isfinite()).all(0)
    if not keep.any():
        return None
    return a[:, keep], b[:, keep]


def pooled_markdown(rows: list[dict]) -> str:
    """Every method over its seeds: the seed-averaged test mean and its difference from NACL [95 % interval]."""
    if not rows:
        return ""
    by = {(r["method"], r["scaling"], r["metric"]): r for r in rows}
    most = max(len(r["seeds"]) for r in rows)
    lines = ["### Every method over its seeds against NACL (Dice+CE base)", ""]
    lines += [
        "Each cell: the method's mean over its seeds and the test cases, then its difference from NACL over the "
        "same seeds and cases [95 % interval of a two-level bootstrap: seeds, then cases, paired by seed and "
        "case], then the range of the per-seed differences. **Bold**: the interval excludes 0. The intervals are "
        f"not corrected for the many comparisons in this table, and with at most {most} seeds the seed level is "
        "coarse: read them as a guide to which differences are larger than the training noise, not as tests.",
        "",
    ]
    label = {"T1": "T = 1", "Tfit": "one T", "Tfit_near": "two T"}
    for t in ("T1", "Tfit", "Tfit_near"):
        keys = [k for k in BOOTSTRAP_KEYS if any((m, t, k) in by for m in METHODS)]
        if not keys:
            continue
        lines += [f"**{label[t]}**", "", "| method | seeds | " + " | ".join(keys) + " |"]
        lines += ["| --- | ---: |" + " ---: |" * len(keys)]
        for method in METHODS:
            cells, seeds = [], None
            for k in keys:
                r = by.get((method, t, k))
                if r is None:
                    cells.append("–")
                    continue
                seeds = len(r["seeds"])
                if method == "nacl_mean":
                    cells.append(f"{r['value']:.4f}")
                    continue
                diff = f"{r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]"
                if r["lo"] > 0 or r["hi"] < 0:
                    diff = f"**{diff}**"
                spread = r["seed_diffs"]
                seeds_text = f"; seeds {min(spread):+.4f}..{max(spread):+.4f}" if len(spread) > 1 else ""
                cells.append(f"{r['value']:.4f} ({diff}{seeds_text})")
            if seeds is not None:
                lines.append(f"| {METHODS[method][0]} | {seeds} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def bootstrap_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["", "### Against NACL, same seed: mean per-case difference (method − NACL) [95 % paired bootstrap]", ""]
    keys = list(dict.fromkeys(r["metric"] for r in rows))
    lines += ["| run | T | " + " | ".join(keys) + " |", "| --- | --- |" + " ---: |" * len(keys)]
    by = {(r["run"], r["scaling"], r["metric"]): r for r in rows}
    for run, t in dict.fromkeys((r["run"], r["scaling"]) for r in rows):
        cells = []
        for k in keys:
            r = by.get((run, t, k))
            cells.append(f"{r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]" if r else "–")
        label = {"T1": "1", "Tfit": "one T", "Tfit_near": "two T"}[t]
        lines.append(f"| {run} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(r: dict, key: str, std: bool = True) -> str:
    return f"{r[key]:.3f} ± {r[key + '_std']:.3f}" if std else f"{r[key]:.3f}"


def markdown(rows: list[dict]) -> str:
    """The tables of docs/results.md: every run at T = 1, the effect of temperature scaling, seeds."""
    by = {(r["run"], r["scaling"]): r for r in rows}
    runs = list(dict.fromkeys(r["run"] for r in rows))
    name = {run: f"{METHODS[parse_run(run)[0]][0]}, seed {parse_run(run)[1]}" for run in runs}
    lines = ["### Test split at T = 1 (mean ± std over the 40 test volumes)", ""]
    cols = ("dice_anterior", "dice_posterior", "hd95", "ece_fg", "ece_all", "cece_fg", "ace_fg", "mce_fg")
    cols += ("nll_fg", "brier_fg", "aece_fg", "ace_monai", "mce_monai")
    lines += ["| run | " + " | ".join(cols) + " | train min |", "| --- |" + " ---: |" * (len(cols) + 1)]
    for run in runs:
        r = by[(run, "T1")]
        minutes = f"{r['train_minutes']:.1f}" + (" (resumed: last segment)" if r["resumed"] else "")
        lines.append(f"| {name[run]} | " + " | ".join(_cell(r, c) for c in cols) + f" | {minutes} |")
    lines += ["", "### Temperature scaling: T fitted on all validation voxels, on foreground voxels, or two T (means)"]
    lines += [""]
    sub = ("ece_fg", "ece_all", "cece_fg")
    head = " | ".join(f"{c} ({t})" for t in ("1", "all", "fg", "two") for c in sub)
    lines += [f"| run | T all | T fg | T two | {head} |", "| --- | ---: | ---: | ---: |" + " ---: |" * 12]
    for run in runs:
        if (run, "Tfit_fg") not in by:
            continue
        t1, ta, tf, tn = (by.get((run, t)) for t in SCALINGS)
        cells = [_cell(r, c, std=False) if r else "–" for r in (t1, ta, tf, tn) for c in sub]
        two = "/".join(f"{v:.2f}" for v in tn["temperature"]) if tn else "–"
        temps = f"{ta['temperature']:.2f} | {tf['temperature']:.2f} | {two}"
        lines.append(f"| {name[run]} | {temps} | " + " | ".join(cells) + " |")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["scaling"]), []).append(r)
    multi = {k: v for k, v in groups.items() if len(v) > 1}
    if multi:
        lines += ["", "### Seeds: mean ± std over seeds of each run's test mean", ""]
        cols = ("dice_mean", "hd95", "ece_fg", "ece_all", "cece_fg", "nll_fg", "brier_fg", "aece_fg", "ace_monai")
        cols += ("mce_monai",)
        lines += ["| method (seeds) | T | " + " | ".join(cols) + " |", "| --- | --- |" + " ---: |" * len(cols)]
        for (method, scaling), group in sorted(multi.items()):
            cells = [
                f"{statistics.fmean(r[c] for r in group):.3f} ± {statistics.stdev(r[c] for r in group):.3f}"
                for c in cols
            ]
            t = {"T1": "1", "Tfit": "fitted, all", "Tfit_fg": "fitted, fg", "Tfit_near": "two T"}[scaling]
            lines.append(f"| {METHODS[method][0]} ({len(group)}) | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _figures(out: Path, runs: list[str]) -> None:
    """Reliability diagrams (ground-truth foreground voxels of the test split) per run, before and after T."""
    from monai_nacl.metrics.calibration import BinStatistics
    from monai_nacl.visualize import plot_reliability

    for run in runs:
        for t in SCALINGS:
            for tag, binning, what in (("fg", "uniform", "foreground"), ("adaptive", "adaptive", "foreground")):
                png = out / "figures" / f"{run}_{t}{'' if tag == 'fg' else '_' + tag}.png"
                bins = out / "runs" / run / f"bins_{t}_{tag}.pt"
                if not bins.is_file():
                    continue
                stats = BinStatistics(**torch.load(bins, weights_only=True), binning=binning)
                method, seed = parse_run(run)
                title = f"{METHODS[method][0]}, seed {seed}, {SCALINGS[t]} (test, {what}, {binning} bins)"
                plot_reliability(stats, png, class_names=CLASS_NAMES, title=title)


_ROUND = re.compile(
    r"ClassAdaptivePenalty round (\d+) \((\w+)\): statistic \[([^\]]*)\], margin \[([^\]]*)\] -> "
    r"penalty_weight \[([^\]]*)\]"
)


def adaptive_rounds(log: Path) -> list[dict]:
    """The multiplier rounds of a class-adaptive run, from its ``train.log``: one ``{"round", "statistic_name",
    "statistic", "margin", "weight"}`` per validation round (the lists per class), in order. A resumed run logs the
    rounds after its checkpoint again; the last entry of each round number is kept."""
    rounds: dict[int, dict] = {}
    for line in log.read_text(errors="replace").splitlines():
        match = _ROUND.search(line)
        if match:
            k, name, stat, margin, weight = match.groups()
            floats = [[float(v) for v in part.split(",")] for part in (stat, margin, weight)]
            rounds[int(k)] = {"round": int(k), "statistic_name": name, "statistic": floats[0], "margin": floats[1]}
            rounds[int(k)]["weight"] = floats[2]
    return [rounds[k] for k in sorted(rounds)]


def _adaptive_figure(out: Path, runs: list[str]) -> None:
    """Per-class weights and constrained statistic over the validation rounds of every class-adaptive run."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    logs = {r: out / "runs" / r / "train.log" for r in runs if parse_run(r)[0] in ADAPTIVE_STATISTIC}
    traces = {r: adaptive_rounds(log) for r, log in logs.items() if log.is_file()}
    traces = {r: t for r, t in traces.items() if t}
    if not traces:
        return
    methods = sorted({parse_run(r)[0] for r in traces})
    fig, axes = plt.subplots(2, len(methods), figsize=(5.5 * len(methods), 7), squeeze=False, sharex=True)
    styles = ["-", "--", ":", "-."]
    for col, method in enumerate(methods):
        runs_of = sorted(r for r in traces if parse_run(r)[0] == method)
        for i, run in enumerate(runs_of):
            rounds = traces[run]
            x = [0] + [t["round"] for t in rounds]
            start = ADAPTIVE_START_WEIGHT
            for c, name in enumerate(CLASS_NAMES):
                colour = plt.get_cmap("tab10")(c)
                label = f"{name}, seed {parse_run(run)[1]}"
                axes[0, col].plot(
                    x, [start] + [t["weight"][c] for t in rounds], styles[i % 4], color=colour, label=label
                )
                axes[1, col].plot(x[1:], [t["statistic"][c] for t in rounds], styles[i % 4], color=colour)
            axes[1, col].axhline(rounds[0]["margin"][0], color="black", lw=0.8, ls="--")
        axes[0, col].set(title=METHODS[method][0], ylabel="penalty weight λ_c")
        axes[1, col].set(
            xlabel="validation round (5 epochs each)", ylabel=f"{rounds[0]['statistic_name']} (dashed: margin)"
        )
        axes[0, col].legend(fontsize=7)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    fig.suptitle("Class-adaptive NACL: the multipliers and what they constrain, per validation round")
    fig.tight_layout()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "figures" / "adaptive_rounds.png", dpi=90)
    plt.close(fig)


def _summary_figures(out: Path, rows: list[dict]) -> None:
    """Dice against foreground ECE, one point per run (seeds of a method share a colour), at T = 1 and two T;
    reliability diagrams of every method side by side (first seed), T = 1 and two T, equal-width and adaptive."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from monai_nacl.metrics.calibration import BinStatistics
    from monai_nacl.visualize import plot_reliability_grid

    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    colours = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, t in zip(axes, ("T1", "Tfit_near")):
        for m in methods:
            points = [(r["ece_fg"], r["dice_mean"]) for r in rows if r["method"] == m and r["scaling"] == t]
            if points:
                ax.scatter(*zip(*points), color=colours[m], label=METHODS[m][0], s=28, edgecolor="black", lw=0.4)
        ax.set(xlabel="ECE, foreground voxels (paper protocol)", title={"T1": "T = 1", "Tfit_near": "two T"}[t])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice (test)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Dice against calibration, one point per run (seed)")
    fig.tight_layout()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "figures" / "dice_vs_ece.png", dpi=90)
    plt.close(fig)
    for t in ("T1", "Tfit_near"):
        for tag, binning in (("fg", "uniform"), ("adaptive", "adaptive")):
            stats = {}
            for m in methods:
                runs = sorted(
                    {(r["seed"] != 123, r["seed"], r["run"]) for r in rows if r["method"] == m}
                )  # seed 123 first: the bundle's seed
                bins = out / "runs" / runs[0][2] / f"bins_{t}_{tag}.pt"
                if bins.is_file():
                    name = f"{METHODS[m][0]}, seed {runs[0][1]}"
                    stats[name] = BinStatistics(**torch.load(bins, weights_only=True), binning=binning)
            if stats:
                title = f"Top-label reliability, test foreground voxels, {SCALINGS[t]}, {binning} bins"
                plot_reliability_grid(stats, out / "figures" / f"reliability_methods_{t}_{tag}.png", title)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="MSD Task04_Hippocampus folder")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "calibration_hippocampus")
    p.add_argument("--runs", nargs="+", default=None, help="runs <method>_s<seed>; default: the full queue")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--val-interval", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="8/4/4 cases, 1 epoch, CE+Dice and NACL only")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--reevaluate", action="store_true", help="evaluate finished runs again (training is kept)")
    p.add_argument(
        "--publish",
        action="store_true",
        help=f"copy the tables, CSV/JSON and summary figures into {PUBLISH_DIR.relative_to(REPO)} and "
        f"{PUBLISH_FIGURES.relative_to(REPO)} (with the report)",
    )
    p.add_argument(
        "--adaptive-pilot",
        metavar="RUN",
        help="print the validation statistics per class that class-adaptive NACL can constrain, for a finished run "
        "(how ADAPTIVE_MARGIN was chosen), and exit",
    )
    args = p.parse_args()
    if args.adaptive_pilot:
        parse_run(args.adaptive_pilot)
        for statistic, values in adaptive_pilot(args.out / "runs" / args.adaptive_pilot, args).items():
            rounded, mean = [round(v, 6) for v in values], statistics.fmean(values)
            print(f"{args.adaptive_pilot}: validation {statistic} per class {rounded}, mean {mean:.6f}")
        return
    if args.quick and args.publish:
        raise SystemExit("--publish copies into docs/: not with --quick")
    if args.quick:
        args.epochs, args.val_interval = 1, 1
        args.out = args.out.with_name(args.out.name + "_quick")
    runs = args.runs or (["dice_ce_s123", "nacl_mean_s123"] if args.quick else DEFAULT_RUNS)
    for run in runs:
        parse_run(run)
    if not (args.data_dir / "dataset.json").is_file():
        raise SystemExit(f"no MSD Task04 dataset.json under {args.data_dir} (set --data-dir)")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    datalist = quick_datalist(args.out) if args.quick else None

    failed: list[str] = []
    for i, run in enumerate([] if args.report_only else runs):
        run_dir = args.out / "runs" / run
        if (run_dir / "result.json").is_file() and not args.reevaluate:
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = claim(run_dir)
        if fd is None:
            print(f"[{i + 1}/{len(runs)}] {run}: another worker has it, skipped", flush=True)
            continue
        try:
            run_one(run, run_dir, i, len(runs), args, datalist, fd)
        except Exception:  # one broken run must not abandon the queue: record it, go on, fail at the end
            import traceback

            failed.append(run)
            _write_atomic(run_dir / "failed.txt", traceback.format_exc())
            print(f"[{i + 1}/{len(runs)}] {run} FAILED (see {run_dir / 'failed.txt'})", flush=True)
        finally:
            os.close(fd)
    report(args.out, runs)
    if args.publish:
        publish(args.out)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {' '.join(failed)}")


def publish(out: Path) -> None:
    """Copy what docs/results.md cites: tables (with a note saying where they come from), machine-readable
    results and the summary figures (the per-run diagrams stay under ``out/figures``)."""
    import shutil

    PUBLISH_DIR.mkdir(parents=True, exist_ok=True)
    PUBLISH_FIGURES.mkdir(parents=True, exist_ok=True)
    if not (out / "tables.md").is_file():
        raise SystemExit(f"nothing to publish: no finished runs under {out}")
    where = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    note = (
        "<!-- generated by `python benchmarks/calibration_hippocampus.py --report-only --publish` from the runs "
        f"under {where}; do not edit -->\n\n"
    )
    for stale in PUBLISH_FIGURES.glob("*.png"):  # figures of methods no longer in the report
        stale.unlink()
    (PUBLISH_DIR / "hippocampus_protocol2.md").write_text(note + (out / "tables.md").read_text())
    for name in ("results.csv", "results.json", "bootstrap.json", "bootstrap_pooled.json"):
        shutil.copyfile(out / name, PUBLISH_DIR / f"hippocampus_protocol2_{name}")
    for png in sorted((out / "figures").glob("*.png")):
        if png.name.startswith(("dice_vs_ece", "reliability_methods_", "adaptive_rounds")):
            shutil.copyfile(png, PUBLISH_FIGURES / png.name)
    print(f"published to {PUBLISH_DIR} and {PUBLISH_FIGURES}")


def run_one(
    run: str, run_dir: Path, i: int, n: int, args: argparse.Namespace, datalist: Path | None, claim_fd: int | None
) -> None:
    """Train (resuming) and evaluate one run."""
    if (run_dir / "result.json").is_file() and not args.reevaluate:
        return  # another worker finished it meanwhile
    method, seed = parse_run(run)
    print(f"[{i + 1}/{n}] {run}: {METHODS[method][0]}, seed {seed}, {args.epochs} epochs", flush=True)
    trained = run_dir / "trained.json"
    if not trained.is_file():
        resumed = any((run_dir / "checkpoints").glob("train_checkpoint_*.pt"))
        start = time.time()
        train(run_dir, method, seed, args, datalist, claim_fd)
        info = {"train_minutes": (time.time() - start) / 60, "epochs": args.epochs, "threads": args.threads}
        info["resumed"] = resumed  # then train_minutes covers the last segment only
        _write_atomic(trained, json.dumps(info))
    info = json.loads(trained.read_text())
    minutes = info["train_minutes"]
    result = {**evaluate(run_dir, args, datalist), **info}
    (run_dir / "failed.txt").unlink(missing_ok=True)
    _write_atomic(run_dir / "result.json", json.dumps(result, indent=1))
    fg = result["T1"]
    print(
        f"  done in {minutes:.1f} min: DSC {fg['dice_mean'][0]:.3f}, ECE(fg) {fg['ece_fg'][0]:.4f} -> "
        f"{result['Tfit']['ece_fg'][0]:.4f} at T={result['temperature']:.3f} (all voxels), "
        f"{result['Tfit_fg']['ece_fg'][0]:.4f} at T={result['temperature_fg']:.3f} (foreground)",
        flush=True,
    )


if __name__ == "__main__":
    main()
