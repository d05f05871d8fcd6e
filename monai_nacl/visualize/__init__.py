"""Figures (matplotlib, Agg backend)."""

from monai_nacl.visualize.reliability import plot_reliability

__all__ = ["plot_reliability"]
