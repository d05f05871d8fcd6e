"""Seed ensembles and flip test-time augmentation of finished Hippocampus runs: what they buy in Dice and ECE.

Cheap routes towards the Hippocampus bundle's quality bar that need no more training: average the softmax
of the three seeds of one method (a deep ensemble) and/or of each network on the volume and its left-right
mirror. Each variant is evaluated exactly as ``calibration_hippocampus.py`` evaluates a single run (test split
at T = 1 and the fitted temperatures), from the runs that script trained.

Usage::

    python benchmarks/ensemble_hippocampus.py                      # CE+Dice and NACL, seeds 123 1 2
    python benchmarks/ensemble_hippocampus.py --methods nacl_a0.5  # another method with three finished seeds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibration_hippocampus as ch  # noqa: E402


class ProbabilityEnsemble(torch.nn.Module):
    """Log of the mean softmax of ``networks``, each also run on the input mirrored along ``flip_dims``.

    Returning log-probabilities keeps the evaluation unchanged: softmax gives back the mean probabilities, and
    dividing by a temperature first tempers the ensemble as a whole.
    """

    def __init__(self, networks: list[torch.nn.Module], flip_dims: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.networks = torch.nn.ModuleList(networks)
        self.flip_dims = flip_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [()] + [(d,) for d in self.flip_dims]
        total = 0.0
        for net in self.networks:
            for dims in views:
                xin = torch.flip(x, dims) if dims else x
                p = torch.softmax(net(xin).float(), 1)
                total = total + (torch.flip(p, dims) if dims else p)
        return torch.log((total / (len(self.networks) * len(views))).clamp_min(1e-12))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=ch.DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=ch.REPO / "runs" / "calibration_hippocampus")
    p.add_argument("--methods", nargs="+", default=["dice_ce", "nacl_mean"])
    p.add_argument("--seeds", nargs="+", type=int, default=list(ch.SEEDS))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="the runs and 8/4/4-case split of the --quick evidence runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    datalist = None
    if args.quick:
        args.out = args.out.with_name(args.out.name + "_quick")
        datalist = ch.quick_datalist(args.out)
    parser, _ = ch._bundle_parts(args, datalist)
    # Spatial dim 0 of a RAS-oriented volume is left-right: the only mirror that is anatomically plausible.
    first, every = (args.seeds[0],), tuple(args.seeds)
    variants = {"flip": (first, (2,)), "ens": (every, ()), "ens_flip": (every, (2,))}
    rows = []
    for method in args.methods:
        for name, (seeds, flips) in variants.items():
            runs = [args.out / "runs" / f"{method}_s{s}" for s in seeds]
            missing = [r.name for r in runs if not (r / "models" / "model.pt").is_file()]
            if missing:
                print(f"skip {method} {name}: no finished run {missing}", flush=True)
                continue
            run_dir = args.out / "ensembles" / f"{method}_{name}"
            run_dir.mkdir(parents=True, exist_ok=True)
            if not (run_dir / "result.json").is_file():
                print(f"{method} {name}: {len(runs)} network(s), mirrored along {flips or 'nothing'}", flush=True)
                network = ProbabilityEnsemble([ch.load_network(parser, r) for r in runs], flips).eval()
                result = ch.evaluate(run_dir, args, datalist, network=network)
                (run_dir / "result.json").write_text(json.dumps({**result, "runs": [r.name for r in runs]}))
            result = json.loads((run_dir / "result.json").read_text())
            rows.append((f"{ch.METHODS[method][0]}, {name}", result))
    for method in args.methods:
        single = args.out / "runs" / f"{method}_s{first[0]}" / "result.json"
        if single.is_file():
            rows.insert(0, (f"{ch.METHODS[method][0]}, seed {first[0]}", json.loads(single.read_text())))
    keys = ("dice_mean", "dice_anterior", "dice_posterior", "hd95", "ece_fg", "cece_fg", "nll_fg", "ece_all")
    lines = ["| model | T | " + " | ".join(keys) + " |", "| --- | --- |" + " ---: |" * len(keys)]
    for label, r in rows:
        for t in (t for t in ch.SCALINGS if t in r):
            lines.append(f"| {label} | {t} | " + " | ".join(f"{r[t][k][0]:.4f}" for k in keys) + " |")
    table = "\n".join(lines) + "\n"
    (args.out / "ensembles.md").write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
