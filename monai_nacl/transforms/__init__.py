"""MONAI transforms for NACL training and inference."""

from monai_nacl.transforms.entropy import VoxelEntropy, VoxelEntropyd
from monai_nacl.transforms.prior import NeighborPrior, NeighborPriord

__all__ = ["NeighborPrior", "NeighborPriord", "VoxelEntropy", "VoxelEntropyd"]
