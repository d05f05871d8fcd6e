"""Reliability diagrams from binned calibration statistics."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from monai_nacl.metrics.calibration import BinStatistics

__all__ = ["plot_reliability", "plot_reliability_grid"]


def _adaptive_edges(count: np.ndarray, conf: np.ndarray, nonempty: np.ndarray) -> np.ndarray:
    """Bar edges for equal-mass bins (``nb + 1`` values). Between two neighbouring non-empty bins the edge lies
    midway between their mean confidences; the outer edges lie half a step beyond the outer means (within
    ``[0, 1]``; one non-empty bin spans ``[0, 1]``). Empty bins get zero width. Equal-mass bins are ordered by
    confidence, so their means ascend; should they not, the equal-width edges are returned."""
    nb = count.size
    means = conf[nonempty]
    if means.size == 0 or np.any(np.diff(means) < 0):
        return np.linspace(0.0, 1.0, nb + 1)
    if means.size == 1:
        bounds = np.array([0.0, 1.0])
    else:
        mids = (means[:-1] + means[1:]) / 2
        first = max(0.0, means[0] - (mids[0] - means[0]))
        last = min(1.0, means[-1] + (means[-1] - mids[-1]))
        bounds = np.concatenate([[first], mids, [last]])
    # bin i starts at the bound after the non-empty bins before it and ends one bound later if it is non-empty
    return bounds[np.concatenate([[0], np.cumsum(nonempty)])]


PANEL_TITLE_WIDTH = 30  # characters per line of a panel title


def _panel(ax_rel, ax_hist, count, conf_sum, acc_sum, title: str, equal_mass: bool = False) -> None:
    count, conf_sum, acc_sum = (np.asarray(a, dtype=float) for a in (count, conf_sum, acc_sum))
    nb = count.size
    nonempty = count > 0
    acc = np.divide(acc_sum, count, out=np.zeros(nb), where=nonempty)
    conf = np.divide(conf_sum, count, out=np.zeros(nb), where=nonempty)
    edges = _adaptive_edges(count, conf, nonempty) if equal_mass else np.linspace(0.0, 1.0, nb + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    ece = float((np.abs(acc - conf) * count).sum() / count.sum()) if count.sum() > 0 else float("nan")
    kind = "adaptive ECE" if equal_mass else "ECE"
    bars = {"width": width[nonempty], "align": "center"}
    ax_rel.bar(centres[nonempty], acc[nonempty], **bars, edgecolor="black", color="tab:blue", label="accuracy")
    gap_lo = np.minimum(acc, conf)[nonempty]
    gap_h = np.abs(acc - conf)[nonempty]
    ax_rel.bar(centres[nonempty], gap_h, bottom=gap_lo, **bars, color="tab:red", alpha=0.35, hatch="//", label="gap")
    if equal_mass:  # bars span unequal ranges: mark where each bin's mean confidence lies
        ax_rel.plot(conf[nonempty], acc[nonempty], "o", color="black", ms=2.5, label="mean confidence")
    ax_rel.plot([0, 1], [0, 1], "k--", lw=1)
    # a panel is ~3 inches wide: longer names (method names in grids) wrap instead of running into the next title
    wrapped = "\n".join(textwrap.wrap(title, PANEL_TITLE_WIDTH)) or title
    ax_rel.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{wrapped}\n{kind} {ece:.4f}")
    ax_rel.legend(loc="upper left", fontsize=7)
    frac = count / max(count.sum(), 1.0)
    if equal_mass:  # every bin holds the same share: show the density of confidences instead
        density = np.divide(frac, width, out=np.zeros(nb), where=width > 0)
        ax_hist.bar(centres, density, width=width, color="tab:gray", edgecolor="black")
        ax_hist.set(xlim=(0, 1), xlabel="confidence (equal-mass bins)", ylabel="density", yscale="log")
    else:
        ax_hist.bar(centres, frac, width=width, color="tab:gray", edgecolor="black")
        ax_hist.set(xlim=(0, 1), xlabel="confidence", ylabel="fraction")


def _save(fig, path: str | Path, title: str, dpi: int) -> Path:
    """Title, lay out, write (folders created) and close a figure; the written path."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_reliability(
    stats: BinStatistics,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Write a PNG: the top-label reliability diagram and one one-vs-rest diagram per class, each with the
    confidence histogram under it. Bars are per-bin accuracy, hatched red the gap to the mean confidence.

    Args:
        stats: statistics from :meth:`monai_nacl.metrics.CalibrationMetric.bin_statistics` (pooled).
        path: output PNG path (folders are created).
        class_names: labels for the per-class panels.
        title: figure title.

    Returns:
        the written path.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    equal_mass = stats.binning == "adaptive"
    pooled = stats.pooled().equal_mass()
    n_classes = pooled.ovr.shape[2]
    names = list(class_names) if class_names is not None else [f"class {i}" for i in range(n_classes)]
    if len(names) != n_classes:
        raise ValueError(f"class_names has {len(names)} names for {n_classes} classes.")
    cols = n_classes + 1
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 4.6), gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
    _panel(axes[0, 0], axes[1, 0], *pooled.top[0], "top-label", equal_mass)
    for c in range(n_classes):
        _panel(axes[0, c + 1], axes[1, c + 1], *pooled.ovr[0, :, c], f"{names[c]} (one-vs-rest)", equal_mass)
    return _save(fig, path, title, dpi=100)


def plot_reliability_grid(
    stats: dict[str, BinStatistics],
    path: str | Path,
    title: str = "",
    columns: int = 4,
) -> Path:
    """Write a PNG of top-label reliability diagrams side by side, one per entry of ``stats`` (e.g. one per
    method), each with its confidence histogram under it, drawn as :func:`plot_reliability` draws them.

    Args:
        stats: panel title -> bin statistics (pooled over the volumes it holds); uniform or adaptive binning.
        path: output PNG path (folders are created).
        title: figure title.
        columns: panels per row.

    Returns:
        the written path.

    Raises:
        ValueError: ``stats`` is empty or ``columns`` is not a positive integer.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not stats:
        raise ValueError("stats is empty: nothing to plot.")
    if not isinstance(columns, int) or isinstance(columns, bool) or columns < 1:
        raise ValueError(f"columns must be a positive integer, got {columns!r}.")
    cols = min(columns, len(stats))
    rows = -(-len(stats) // cols)
    fig, axes = plt.subplots(
        2 * rows, cols, figsize=(3.2 * cols, 4.6 * rows), gridspec_kw={"height_ratios": [3, 1] * rows}, squeeze=False
    )
    for i, (name, panel_stats) in enumerate(stats.items()):
        r, c = divmod(i, cols)
        pooled = panel_stats.pooled().equal_mass()
        _panel(axes[2 * r, c], axes[2 * r + 1, c], *pooled.top[0], name, panel_stats.binning == "adaptive")
    for i in range(len(stats), rows * cols):  # unused cells of the last row
        r, c = divmod(i, cols)
        axes[2 * r, c].axis("off")
        axes[2 * r + 1, c].axis("off")
    return _save(fig, path, title, dpi=90)
