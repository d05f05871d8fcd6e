"""Data helpers: synthetic phantoms, datalists on disk and integrity checks."""

from monai_nacl.data.datalist import check_datalist, load_datalist, phantom_datalist
from monai_nacl.data.phantoms import PHANTOM_CLASSES, make_phantom, make_phantoms

__all__ = ["PHANTOM_CLASSES", "make_phantom", "make_phantoms", "phantom_datalist", "check_datalist", "load_datalist"]
