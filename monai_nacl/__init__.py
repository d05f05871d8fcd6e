"""monai-nacl: Neighbor-Aware CaLibration (NACL) for MONAI segmentation."""

__version__ = "0.1.0"
