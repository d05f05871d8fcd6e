"""Data helpers: synthetic phantoms, dataset layouts and fixtures, datalists on disk and integrity checks."""

from monai_nacl.data.datalist import check_datalist, load_datalist, phantom_datalist
from monai_nacl.data.fixtures import write_fixture
from monai_nacl.data.inference import IMAGE_SUFFIXES, InferenceDataset, image_datalist
from monai_nacl.data.layouts import LAYOUTS, build_datalist, find_cases, inference_datalist
from monai_nacl.data.phantoms import PHANTOM_CLASSES, make_phantom

__all__ = [
    "IMAGE_SUFFIXES",
    "InferenceDataset",
    "image_datalist",
    "LAYOUTS",
    "PHANTOM_CLASSES",
    "build_datalist",
    "check_datalist",
    "find_cases",
    "inference_datalist",
    "load_datalist",
    "make_phantom",
    "phantom_datalist",
    "write_fixture",
]
