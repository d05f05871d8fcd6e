"""Conformal prediction with the shipped Hippocampus model: calibrate on the validation split, measure on the test split.

The Hippocampus bundle's network (``network_def`` of ``inference.json``) with the shipped weights (``models/model.pt``:
NACL, temperature-scaled with two temperatures; or ``models/model_dice_ce.pt``) runs the bundle's validation
preprocessing (``train.json`` ``validate#preprocessing``) and sliding-window inferer on the 20 validation cases
(the conformal calibration split) and the 40 test cases. For ``alpha`` in (0.1, 0.05), on softmax probabilities:

* ``ConformalPredictionSets`` (LAC, case-level rank, argmax fallback): voxel coverage and mean set size on the test
  split, and how many voxels keep only the argmax through the fallback;
* ``ConformalRiskControl``: mean FNR of the outer mask and mean false-positive volume of the inner mask per
  structure, and how many voxels the masks add to / remove from the argmax segmentation;
* ``ConformalVolumeIntervals``: coverage and mean width (mL) of the structure-volume intervals;
* a naive volume interval: argmax volume ± k·σ (σ the std of the validation residuals, k = 1.645 / 1.96).

Everything is done twice, with the shipped temperatures and with the same weights at T = 1, to show what
calibration changes (the guarantees hold for both; the tightness differs). Probabilities of the cases are kept in
memory only. Also written to ``--out``: ``conformal_masks.png`` (inner/outer contours of the risk-controlled masks,
alpha 0.1, on one test slice) and, with the shipped temperatures, ``model.conformal.json``: the record
``calibrate.json``'s ``ConformalFitHandler`` writes for these weights (risk control and volume intervals for both
alphas on the validation split), beside a copy of the weights it was checked against.

Usage::

    python benchmarks/conformal_hippocampus.py                      # 20 + 40 cases, a few minutes on CPU
    python benchmarks/conformal_hippocampus.py --quick 3            # 3 + 3 cases (smoke test)
    python benchmarks/conformal_hippocampus.py --model model_dice_ce.pt
    python benchmarks/conformal_hippocampus.py --figure docs/figures/conformal_hippocampus_masks.png
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "hippocampus_mri_nacl_segmentation"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus"
CLASS_NAMES = ("background", "anterior", "posterior")
STRUCTURES = (1, 2)
ALPHAS = (0.1, 0.05)
NAIVE_K = {0.1: 1.645, 0.05: 1.96}


def build(model: str, data: Path):
    """``(network, preprocessing, inferer, datalist)`` of the bundle: the network in eval mode on the CPU."""
    from monai.bundle import ConfigParser

    train = ConfigParser()
    train.read_config(str(BUNDLE / "configs" / "train.json"))
    train.update({"bundle_root": str(BUNDLE), "dataset_dir": str(data), "device": "$torch.device('cpu')"})
    preprocessing = train.get_parsed_content("validate#preprocessing")
    inferer = train.get_parsed_content("validate#inferer")
    datalist = train.get_parsed_content("datalist")

    infer = ConfigParser()
    infer.read_config(str(BUNDLE / "configs" / "inference.json"))
    infer.update({"bundle_root": str(BUNDLE), "dataset_dir": str(data), "device": "$torch.device('cpu')"})
    network = infer.get_parsed_content("network_def", instantiate=True)
    state = torch.load(BUNDLE / "models" / model, weights_only=True, map_location="cpu")
    network.load_state_dict(state)
    return network.eval(), preprocessing, inferer, datalist


def infer_cases(networks: dict, preprocessing, inferer, items: list[dict], split: str) -> list[dict]:
    """Per case: probabilities of every network (``C,*spatial`` float32), labels ``1,*spatial``, spacing (mm)."""
    cases = []
    for i, item in enumerate(items):
        start = time.time()
        data = preprocessing(dict(item))
        image, label = data["image"], data["label"]
        spacing = [float(s) for s in image.pixdim[:3]]
        probs = {}
        with torch.no_grad():
            for name, net in networks.items():
                logits = inferer(torch.as_tensor(image)[None].float(), net)
                probs[name] = torch.softmax(torch.as_tensor(logits).float(), 1)[0]
        y = torch.as_tensor(label).long()
        cases.append(
            {
                "name": Path(item["image"]).name,
                "probs": probs,
                "label": y,
                "spacing": spacing,
                "image": torch.as_tensor(image)[0].float(),
            }
        )
        shape = "x".join(str(s) for s in y.shape[1:])
        print(f"  {split} {i + 1}/{len(items)} {cases[-1]['name']} ({shape}) {time.time() - start:.2f} s", flush=True)
    return cases


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def evaluate(calib: list[dict], test: list[dict], key: str, alpha: float) -> tuple[dict, list]:
    """Fit the three methods on ``calib`` with the probabilities ``key`` and measure them on ``test``.

    Returns:
        the measurements, and the fitted ``[risk control, volume intervals]`` (what the bundle's record holds).
    """
    from monai_nacl.conformal import ConformalPredictionSets, ConformalRiskControl, ConformalVolumeIntervals

    C = len(CLASS_NAMES)
    sets = ConformalPredictionSets(C, method="lac", class_names=CLASS_NAMES)
    crc = ConformalRiskControl(C, class_names=CLASS_NAMES)
    vol = ConformalVolumeIntervals(C, class_names=CLASS_NAMES)
    for case in calib:
        p, y = case["probs"][key], case["label"]
        sets.update(p, y)
        crc.update(p, y)
        vol.update(p, y, spacing=case["spacing"])
    q = sets.fit(alpha)
    t_in, t_out = crc.fit(alpha)
    vq = vol.fit(alpha)

    cov, size, cov_fg, size_fg, fallback, multi = [], [], [], [], [], []
    fnr = {c: [] for c in STRUCTURES}
    fpv = {c: [] for c in STRUCTURES}
    fnr_argmax = {c: [] for c in STRUCTURES}
    fpv_argmax = {c: [] for c in STRUCTURES}
    grow = {c: [] for c in STRUCTURES}
    shrink = {c: [] for c in STRUCTURES}
    vcov = {c: [] for c in STRUCTURES}
    vwidth = {c: [] for c in STRUCTURES}
    for case in test:
        p, y = case["probs"][key], case["label"][0]
        mask = sets.predict(p)  # C,*spatial
        raw = (sets.scores(p[None])[0] <= q) if math.isfinite(q) else mask  # LAC: deterministic scores
        hit = mask.gather(0, y[None])[0]
        n_set = mask.sum(0)
        fg = y > 0
        cov.append(float(hit.float().mean()))
        size.append(float(n_set.float().mean()))
        cov_fg.append(float(hit[fg].float().mean()))
        size_fg.append(float(n_set[fg].float().mean()))
        fallback.append(float((raw.sum(0) == 0).float().mean()))  # sets that are the argmax only by the fallback
        multi.append(float((n_set > 1).float().mean()))

        inner, outer = crc.predict(p)
        pred = p.argmax(0)
        low, high = vol.predict(p, spacing=case["spacing"])
        v_ml = math.prod(case["spacing"]) / 1000.0
        for c in STRUCTURES:
            true, seg = y == c, pred == c
            n_true = int(true.sum())
            if n_true:
                fnr[c].append(float((true & ~outer[c]).sum()) / n_true)
                fpv[c].append(min(1.0, float((inner[c] & ~true).sum()) / n_true))
                fnr_argmax[c].append(float((true & ~seg).sum()) / n_true)
                fpv_argmax[c].append(min(1.0, float((seg & ~true).sum()) / n_true))
            grow[c].append(float((outer[c] & ~seg).sum()))
            shrink[c].append(float((seg & ~inner[c]).sum()))
            v_true = n_true * v_ml
            vcov[c].append(float(low[c] <= v_true <= high[c]))
            vwidth[c].append(float(high[c] - low[c]))

    structures = {}
    for c in STRUCTURES:
        structures[CLASS_NAMES[c]] = {
            "t_out": float(t_out[c]),
            "t_in": float(t_in[c]),
            "outer_fnr": _mean(fnr[c]),
            "inner_fpv": _mean(fpv[c]),
            "argmax_fnr": _mean(fnr_argmax[c]),
            "argmax_fpv": _mean(fpv_argmax[c]),
            "outer_growth_voxels": _mean(grow[c]),
            "inner_shrink_voxels": _mean(shrink[c]),
            "n_calibration": int(crc.n[c]),
            "volume_quantile": float(vq[c]),
            "volume_coverage": _mean(vcov[c]),
            "volume_width_ml": _mean(vwidth[c]),
        }
    return {
        "sets": {
            "threshold": float(q),
            "n_cases": int(sets.n),
            "n_scores": int(sets.num_scores),
            "coverage": _mean(cov),
            "mean_set_size": _mean(size),
            "coverage_foreground": _mean(cov_fg),
            "mean_set_size_foreground": _mean(size_fg),
            "fallback_fraction": _mean(fallback),
            "multi_fraction": _mean(multi),
        },
        "structures": structures,
    }, [crc, vol]


def naive_intervals(calib: list[dict], test: list[dict], key: str) -> dict:
    """Argmax volume ± k·σ, σ the sample std of the validation residuals (true − argmax volume), per structure."""

    def volumes(case: dict, c: int) -> tuple[float, float]:
        v_ml = math.prod(case["spacing"]) / 1000.0
        pred = case["probs"][key].argmax(0)
        return float((pred == c).sum()) * v_ml, float((case["label"][0] == c).sum()) * v_ml

    out: dict = {}
    for alpha in ALPHAS:
        k = NAIVE_K[alpha]
        out[str(alpha)] = {"k": k}
        for c in STRUCTURES:
            residuals = [t - p for p, t in (volumes(case, c) for case in calib)]
            sigma = statistics.stdev(residuals) if len(residuals) > 1 else math.inf
            hits = []
            for case in test:
                p, t = volumes(case, c)
                hits.append(float(max(0.0, p - k * sigma) <= t <= p + k * sigma))
            width = [min(2 * k * sigma, volumes(case, c)[0] + k * sigma) for case in test]  # low clipped at 0
            out[str(alpha)][CLASS_NAMES[c]] = {
                "sigma_ml": sigma,
                "mean_residual_ml": _mean(residuals),
                "coverage": _mean(hits),
                "width_ml": _mean(width),
            }
    return out


def _f(x: float, digits: int = 3) -> str:
    return "∞" if math.isinf(x) else f"{x:.{digits}f}"


def tables(result: dict) -> str:
    """Markdown tables of ``result``."""
    scalings = result["scalings"]
    lines = ["### Voxel prediction sets (LAC), test split", ""]
    lines += [
        "| T | alpha | q | coverage | mean set size | coverage (fg) | set size (fg) | sets > 1 class | argmax fallback |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t, label in scalings.items():
        for alpha in ALPHAS:
            s = result[t][str(alpha)]["sets"]
            lines.append(
                f"| {label} | {alpha} | {_f(s['threshold'], 4)} | {_f(s['coverage'], 4)} | {_f(s['mean_set_size'])} | "
                f"{_f(s['coverage_foreground'], 4)} | {_f(s['mean_set_size_foreground'])} | "
                f"{_f(s['multi_fraction'], 4)} | {_f(s['fallback_fraction'], 4)} |"
            )
    lines += ["", "### Risk-controlled masks per structure, test split (mean over cases)", ""]
    lines += [
        "| T | alpha | structure | t_out | outer FNR | +voxels vs argmax | t_in | inner FP volume | −voxels vs argmax "
        "| argmax FNR | argmax FP volume |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t, label in scalings.items():
        for alpha in ALPHAS:
            for name, s in result[t][str(alpha)]["structures"].items():
                lines.append(
                    f"| {label} | {alpha} | {name} | {_f(s['t_out'])} | {_f(s['outer_fnr'], 4)} | "
                    f"{_f(s['outer_growth_voxels'], 0)} | {_f(s['t_in'])} | {_f(s['inner_fpv'], 4)} | "
                    f"{_f(s['inner_shrink_voxels'], 0)} | {_f(s['argmax_fnr'], 4)} | {_f(s['argmax_fpv'], 4)} |"
                )
    lines += ["", "### Structure-volume intervals, test split", ""]
    lines += [
        "| method | alpha | structure | q | coverage | mean width (mL) |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for t, label in scalings.items():
        for alpha in ALPHAS:
            for name, s in result[t][str(alpha)]["structures"].items():
                lines.append(
                    f"| conformal, {label} | {alpha} | {name} | {_f(s['volume_quantile'])} | "
                    f"{_f(s['volume_coverage'])} | {_f(s['volume_width_ml'])} |"
                )
    for alpha in ALPHAS:
        naive = result["naive"][str(alpha)]
        for c in STRUCTURES:
            s = naive[CLASS_NAMES[c]]
            lines.append(
                f"| naive argmax ± {naive['k']}·σ (σ = {_f(s['sigma_ml'])} mL) | {alpha} | {CLASS_NAMES[c]} | – | "
                f"{_f(s['coverage'])} | {_f(s['width_ml'])} |"
            )
    return "\n".join(lines) + "\n"


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MSD Task04_Hippocampus folder")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "conformal_hippocampus")
    p.add_argument("--quick", type=int, default=0, metavar="N", help="only N validation and N test cases")
    p.add_argument("--model", default="model.pt", choices=("model.pt", "model_dice_ce.pt"))
    p.add_argument("--figure", type=Path, default=None, help="PNG of the masks (default: OUT/conformal_masks.png)")
    args = p.parse_args(argv)
    if not (args.data / "dataset.json").is_file():
        raise SystemExit(f"no MSD Task04 dataset.json under {args.data} (set --data)")
    t0 = time.time()

    network, preprocessing, inferer, datalist = build(args.model, args.data)
    plain = copy.deepcopy(network)
    plain.set_temperature(1.0)
    temperature = [float(t) for t in network.temperature]
    networks = {"calibrated": network, "T1": plain.eval()}
    scalings = {"calibrated": "T = " + "/".join(f"{t:.2f}" for t in temperature), "T1": "T = 1"}
    val, test = datalist["validation"], datalist["test"]
    if args.quick:
        val, test = val[: args.quick], test[: args.quick]
    print(f"{args.model}: temperatures {temperature} (elsewhere / near the predicted foreground)", flush=True)
    calib = infer_cases(networks, preprocessing, inferer, val, "validation")
    cases = infer_cases(networks, preprocessing, inferer, test, "test")
    t_infer = time.time() - t0

    result: dict = {
        "model": args.model,
        "temperature": temperature,
        "n_calibration": len(calib),
        "n_test": len(cases),
        "alphas": list(ALPHAS),
        "scalings": scalings,
    }
    fitted: dict = {}
    for key in networks:
        result[key] = {}
        for alpha in ALPHAS:
            result[key][str(alpha)], fitted[key, alpha] = evaluate(calib, cases, key, alpha)
    # the argmax is the same at every temperature (one T per voxel), so the naive baseline is too
    result["naive"] = naive_intervals(calib, cases, "calibrated")
    result["seconds"] = {"inference": t_infer, "total": time.time() - t0}
    result["threads"] = torch.get_num_threads()

    text = tables(result)
    print()
    print(text)
    print(f"inference {t_infer:.1f} s, total {result['seconds']['total']:.1f} s ({result['threads']} threads)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(_jsonable(result), indent=1, allow_nan=False))
    (args.out / "tables.md").write_text(text)
    crc, _ = fitted["calibrated", ALPHAS[0]]
    figure = plot_masks(cases, crc, args.figure or args.out / "conformal_masks.png")
    print(f"wrote {figure}")
    record = write_record(network, args.model, args.out, [f for alpha in ALPHAS for f in fitted["calibrated", alpha]])
    print(f"wrote {record}")
    return result


def write_record(network, model: str, out: Path, fits: list) -> Path:
    """The conformal record of the shipped weights (calibrated temperatures), beside a copy of them in ``out``."""
    from monai_nacl.conformal import conformal_record_path, save_conformal
    from monai_nacl.temperature import weights_fingerprint

    weights = out / model
    shutil.copyfile(BUNDLE / "models" / model, weights)
    save_conformal(
        weights,
        fits,
        weights_fingerprint(network),
        network.temperature,
        fitted_by="benchmarks/conformal_hippocampus.py",
        cases=fits[0].n[1],
        data="validation split of configs/datalist.json (MSD Task04)",
    )
    return conformal_record_path(weights)


def plot_masks(cases: list[dict], crc, path: Path) -> Path:
    """Inner (solid) and outer (dashed) risk-controlled contours, the argmax segmentation (dotted) and the ground
    truth (filled, translucent) on the axial slice with the largest true hippocampus area of the median-size test
    case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int((case["label"] > 0).sum()) for case in cases]
    case = cases[sorted(range(len(cases)), key=sizes.__getitem__)[len(cases) // 2]]
    p, y = case["probs"]["calibrated"], case["label"][0]
    inner, outer = crc.predict(p)
    z = int((y > 0).flatten(0, 1).sum(0).argmax())
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.8), dpi=120)
    colours = {1: "tab:orange", 2: "tab:cyan"}
    for ax, c in zip(axes, STRUCTURES):
        ax.imshow(case["image"][:, :, z].T.numpy(), cmap="gray", origin="lower", interpolation="nearest")
        truth = (y[:, :, z] == c).float().T
        ax.imshow(
            torch.where(truth > 0, 1.0, float("nan")).numpy(),
            cmap="Greens",
            alpha=0.35,
            vmin=0,
            vmax=1.5,
            origin="lower",
        )
        for mask, style, width in ((outer[c], "--", 1.6), (inner[c], "-", 1.6), (p.argmax(0) == c, ":", 1.2)):
            m = mask[:, :, z].float().T
            if bool(m.any()):
                ax.contour(m.numpy(), levels=[0.5], colors=colours[c], linestyles=style, linewidths=width)
        ax.set_title(
            f"{CLASS_NAMES[c]}: inner t_in={float(crc.inner_threshold[c]):.2f} (solid), "
            f"outer t_out={float(crc.outer_threshold[c]):.2f} (dashed)",
            fontsize=8,
        )
        ax.set_axis_off()
    fig.suptitle(
        f"{case['name']}, slice {z}: risk-controlled masks, alpha {crc.alpha} (n = {crc.n[1]} calibration cases); "
        "dotted: argmax, green: ground truth",
        fontsize=8,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
