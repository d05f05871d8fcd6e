"""Data helpers: synthetic phantoms (and, later, dataset layouts and integrity checks)."""

from monai_nacl.data.phantoms import PHANTOM_CLASSES, make_phantom, make_phantoms

__all__ = ["PHANTOM_CLASSES", "make_phantom", "make_phantoms"]
