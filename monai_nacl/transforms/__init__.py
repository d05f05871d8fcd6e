"""MONAI transforms for NACL training and inference."""

from monai_nacl.transforms.checks import EnsureFinited
from monai_nacl.transforms.conformal import ConformalMasksd, StructureVolumeIntervalsd
from monai_nacl.transforms.entropy import VoxelEntropy, VoxelEntropyd
from monai_nacl.transforms.outputs import OUTPUT_KINDS, SelectOutputd, StructureSummaryd
from monai_nacl.transforms.prior import NeighborPrior, NeighborPriord
from monai_nacl.transforms.spacing import SafeSpacingd

__all__ = [
    "ConformalMasksd",
    "EnsureFinited",
    "NeighborPrior",
    "NeighborPriord",
    "OUTPUT_KINDS",
    "SafeSpacingd",
    "SelectOutputd",
    "StructureSummaryd",
    "StructureVolumeIntervalsd",
    "VoxelEntropy",
    "VoxelEntropyd",
]
