"""Calibration metric update: time, extra peak memory and state size, ours (uniform and adaptive bins) vs MONAI's
CalibrationErrorMetric.

Each measurement runs in a fresh subprocess so that the peak resident memory (``ru_maxrss``) of one
method does not hide another's. "extra peak" is the growth of the peak RSS during the updates, after the
inputs exist; MONAI's time includes the one-hot conversion it needs.
Run: ``python benchmarks/bench_metrics.py [--size 96] [--classes 4] [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(method: str, size: int, classes: int, repeats: int, mask: str, binning: str = "uniform") -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, classes, size, size, size) * 2, 1)
    labels = torch.randint(0, classes, (2, 1, size, size, size))
    if method == "ours":
        from monai_nacl.metrics import CalibrationMetric

        metric = CalibrationMetric(classes, mask=mask, binning=binning)

        def step():
            metric(probs, labels)

        def state_numel():
            return sum(t.numel() for t in (metric._pooled.top, metric._pooled.ovr, metric._pooled.scalars))

    else:
        from monai.metrics import CalibrationErrorMetric

        metric = CalibrationErrorMetric(num_bins=15, include_background=True)

        def step():
            onehot = F.one_hot(labels[:, 0], classes).movedim(-1, 1).float()
            metric(probs, onehot)

        def state_numel():
            return sum(t.numel() for t in metric.get_buffer()) if metric.get_buffer() is not None else 0

    base = _rss_mb()
    times, states = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        states.append(state_numel())
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "extra_peak_mb": _rss_mb() - base,
        "probs_mb": probs.numel() * 4 / 2**20,
        "state_numel_after_1_and_n": [states[0], states[-1]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, mask, binning = args.worker
        print(json.dumps(worker(method, args.size, args.classes, args.repeats, mask, binning)))
        return
    import torch

    print(f"torch {torch.__version__}, {platform.machine()}, threads {torch.get_num_threads()}")
    print(f"update on probabilities 2x{args.classes}x{args.size}^3 float32 + labels, median of {args.repeats}")
    rows = {}
    cases = [("monai", "all", "uniform"), ("ours", "all", "uniform"), ("ours", "foreground", "uniform")]
    for method, mask, binning in cases + [("ours", "all", "adaptive")]:
        cmd = [sys.executable, __file__, "--size", str(args.size), "--classes", str(args.classes)]
        cmd += ["--repeats", str(args.repeats), "--worker", method, mask, binning]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[(method, mask, binning)] = r = json.loads(out)
        name = "monai CalibrationErrorMetric (+one-hot)" if method == "monai" else f"ours, mask={mask}"
        name += ", adaptive" if binning == "adaptive" else ""
        print(
            f"  {name:42s} {r['median_s'] * 1000:7.1f} ms (min {r['min_s'] * 1000:5.1f})   extra peak {r['extra_peak_mb']:6.1f} MB "
            f"(probabilities {r['probs_mb']:.0f} MB)   state elements after 1 / {args.repeats} updates: "
            f"{r['state_numel_after_1_and_n'][0]} / {r['state_numel_after_1_and_n'][1]}"
        )
    speedup = rows[("monai", "all", "uniform")]["median_s"] / rows[("ours", "all", "uniform")]["median_s"]
    print(f"  speed-up (all voxels): {speedup:.2f}x")


if __name__ == "__main__":
    main()
