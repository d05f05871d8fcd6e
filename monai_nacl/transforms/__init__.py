"""MONAI transforms for NACL training and inference."""

from monai_nacl.transforms.entropy import VoxelEntropy, VoxelEntropyd
from monai_nacl.transforms.prior import NeighborPrior, NeighborPriord
from monai_nacl.transforms.spacing import SafeSpacingd

__all__ = ["NeighborPrior", "NeighborPriord", "SafeSpacingd", "VoxelEntropy", "VoxelEntropyd"]
