"""Reliability diagrams: equal-width bins at their fixed positions, equal-mass bins where their voxels lie."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from monai_nacl.metrics import CalibrationMetric
from monai_nacl.visualize import plot_reliability
from monai_nacl.visualize.reliability import _adaptive_edges

matplotlib.use("Agg")


def _confident_volume(seed: int = 0):
    """Confidences piled up near 1, as a trained segmentation network's are."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 3, 12, 12, 12, generator=g) * 4
    label = torch.randint(0, 3, (1, 1, 12, 12, 12), generator=g)
    logits.scatter_add_(1, label, torch.full_like(logits[:, :1], 6.0))
    return torch.softmax(logits, 1), label


def _bars(monkeypatch, stats):
    """Call plot_reliability and return the bar rectangles of its first panel (accuracy bars, then gap bars)."""
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.bar

    def recording_bar(self, x, height, *args, **kwargs):
        container = original(self, x, height, *args, **kwargs)
        drawn.append((self, [(r.get_x(), r.get_x() + r.get_width()) for r in container.patches]))
        return container

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", recording_bar)
    return drawn


def test_adaptive_bins_are_drawn_over_the_confidences_they_hold(tmp_path, monkeypatch):
    probs, label = _confident_volume()
    metric = CalibrationMetric(3, mask="all", binning="adaptive", num_bins=10)
    metric.update(probs, label)
    stats = metric.bin_statistics()
    drawn = _bars(monkeypatch, stats)
    path = plot_reliability(stats, tmp_path / "adaptive.png", class_names=["bg", "a", "b"])
    assert path.stat().st_size > 10_000
    top = stats.pooled().equal_mass().top[0].numpy()
    conf = top[1] / top[0]
    spans = drawn[0][1]  # top-label accuracy bars
    assert len(spans) == 10
    # each bar covers its bin's mean confidence, bars tile [0, 1] in confidence order without overlap
    for (lo, hi), c in zip(spans, conf):
        assert lo - 1e-9 <= c <= hi + 1e-9
    assert 0.0 <= spans[0][0] and spans[-1][1] <= 1.0
    assert all(a[1] == pytest.approx(b[0]) and a[1] > a[0] for a, b in zip(spans, spans[1:]))
    # most voxels are confident, so equal-mass bars are narrow near 1 (equal-width bars would all be 0.1 wide)
    assert spans[-1][1] - spans[-1][0] < 0.05
    title = drawn[0][0].get_title()
    assert "adaptive ECE" in title
    assert float(title.split()[-1]) == pytest.approx(metric.aggregate()["ece"], abs=1e-4)


def test_equal_width_bins_keep_their_fixed_positions(tmp_path, monkeypatch):
    probs, label = _confident_volume()
    metric = CalibrationMetric(3, mask="all", num_bins=10)
    metric.update(probs, label)
    drawn = _bars(monkeypatch, metric.bin_statistics())
    plot_reliability(metric.bin_statistics(), tmp_path / "uniform.png")
    for lo, hi in drawn[0][1]:
        assert hi - lo == pytest.approx(0.1)
        assert round(lo * 10, 6) == pytest.approx(round(lo * 10))  # on the grid k/10


def test_adaptive_edges_give_every_non_empty_bin_a_width():
    count = np.array([0.0, 2.0, 0.0, 3.0, 1.0])
    conf = np.array([0.0, 0.3, 0.0, 0.8, 0.9])
    edges = _adaptive_edges(count, conf, count > 0)
    widths = np.diff(edges)
    assert np.all(widths[count > 0] > 0) and np.all(widths[count == 0] == 0)
    assert edges[1] <= 0.3 <= edges[2] and edges[3] <= 0.8 <= edges[4] and edges[4] <= 0.9 <= edges[5]
    assert edges[2] == pytest.approx(0.55) and edges[4] == pytest.approx(0.85)  # midway between neighbours
    assert 0.0 <= edges[0] and edges[-1] <= 1.0
    # a single non-empty bin spans everything; nothing at all, or unordered means: the equal-width edges
    assert _adaptive_edges(
        np.array([0.0, 5.0, 0.0]), np.array([0.0, 0.6, 0.0]), np.array([0, 1, 0], bool)
    ).tolist() == [
        0.0,
        0.0,
        1.0,
        1.0,
    ]
    uniform = np.linspace(0, 1, 4)
    assert np.allclose(_adaptive_edges(np.zeros(3), np.zeros(3), np.zeros(3, bool)), uniform)
    assert np.allclose(_adaptive_edges(np.ones(3), np.array([0.9, 0.5, 0.2]), np.ones(3, bool)), uniform)


def test_reliability_grid_draws_one_panel_per_entry(tmp_path, monkeypatch):
    from monai_nacl.visualize import plot_reliability_grid

    stats = {}
    for seed, binning in enumerate(("uniform", "adaptive", "uniform")):
        metric = CalibrationMetric(3, mask="all", binning=binning, num_bins=10)
        metric.update(*_confident_volume(seed))
        stats[f"method {seed} ({binning})"] = metric.bin_statistics()
    drawn = _bars(monkeypatch, stats)
    path = plot_reliability_grid(stats, tmp_path / "grid.png", title="three methods", columns=2)
    assert path.stat().st_size > 10_000
    titles = [ax.get_title() for ax, _ in drawn if ax.get_title()]
    assert len(dict.fromkeys(titles)) == 3
    assert [t.split("\n")[-1].split()[0] for t in dict.fromkeys(titles)] == ["ECE", "adaptive", "ECE"]
    with pytest.raises(ValueError, match="stats is empty"):
        plot_reliability_grid({}, tmp_path / "none.png")
    with pytest.raises(ValueError, match="columns"):
        plot_reliability_grid(stats, tmp_path / "bad.png", columns=0)


def test_long_panel_titles_wrap_within_their_panel(tmp_path, monkeypatch):
    from monai_nacl.visualize import plot_reliability_grid
    from monai_nacl.visualize.reliability import PANEL_TITLE_WIDTH

    metric = CalibrationMetric(3, mask="all", num_bins=10)
    metric.update(*_confident_volume())
    name = "Class-adaptive NACL (augmented Lagrangian), seed 123"
    drawn = _bars(monkeypatch, {name: metric.bin_statistics()})
    plot_reliability_grid({name: metric.bin_statistics()}, tmp_path / "grid.png")
    title = next(ax.get_title() for ax, _ in drawn if ax.get_title())
    *name_lines, metric_line = title.split("\n")
    assert len(name_lines) > 1 and all(len(line) <= PANEL_TITLE_WIDTH for line in name_lines)
    assert " ".join(name_lines) == name and metric_line.startswith("ECE")
