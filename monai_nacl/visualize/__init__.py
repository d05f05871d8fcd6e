"""Figures (matplotlib, Agg backend)."""

from monai_nacl.visualize.reliability import plot_reliability, plot_reliability_grid

__all__ = ["plot_reliability", "plot_reliability_grid"]
