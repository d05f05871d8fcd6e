"""Forward+backward timing of NACL losses against cross-entropy and MONAI's NACLLoss.

Prints the median wall time of ``loss(logits, labels).backward()`` over repeats, and the ratio to plain
cross-entropy. Run: ``python benchmarks/bench_loss.py [--classes 4 14] [--size 96] [--repeats 15] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from monai.losses import NACLLoss as MonaiNACLLoss

from monai_nacl.losses import NACLLoss


def median_time(fn, repeats: int, device: str) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(classes: int, size: int, batch: int, repeats: int, device: str) -> None:
    torch.manual_seed(0)
    shape = (batch, classes, size, size, size)
    logits = torch.randn(shape, device=device, requires_grad=True)
    labels = torch.randint(0, classes, (batch, 1, size, size, size), device=device)
    labels_b = labels[:, 0]
    ours_zero = NACLLoss(classes, padding="zeros")
    ours = NACLLoss(classes)
    ours_g = NACLLoss(classes, kernel="gaussian")
    prior = ours.prior(labels)
    monai_mean = MonaiNACLLoss(classes, 3).to(device)
    monai_gauss = MonaiNACLLoss(classes, 3, kernel_ops="gaussian").to(device)

    def step(f):
        def go():
            logits.grad = None
            f().backward()

        return go

    cases = {
        "cross_entropy (torch)": lambda: F.cross_entropy(logits, labels_b),
        "naive CE + L1(prior)": lambda: F.cross_entropy(logits, labels_b) + 0.1 * (prior - logits).abs().mean(),
        "monai NACLLoss mean": lambda: monai_mean(logits, labels_b),
        "monai NACLLoss gaussian": lambda: monai_gauss(logits, labels_b),
        "ours precomputed prior": lambda: ours(logits, labels, prior=prior),
        "ours on the fly, zeros (= monai mean)": lambda: ours_zero(logits, labels),
        "ours on the fly, replicate": lambda: ours(logits, labels),
        "ours on the fly, gaussian (SVLS)": lambda: ours_g(logits, labels),
    }
    print(f"\nlogits {batch}x{classes}x{size}^3 float32 on {device}: median of {repeats} fwd+bwd")
    base = None
    for name, f in cases.items():
        t = median_time(step(f), repeats, device)
        base = base or t
        print(f"  {name:40s} {t * 1000:8.1f} ms   {t / base:5.2f}x CE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--classes", type=int, nargs="+", default=[4, 14])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}")
    if args.device == "cuda":
        print(torch.cuda.get_device_name())
    for c in args.classes:
        run(c, args.size, args.batch, args.repeats, args.device)


if __name__ == "__main__":
    main()
