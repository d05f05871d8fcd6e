"""Inference inputs: every image in a folder, and a dataset that reports bad files by name and goes on."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from monai.data import IterableDataset
from monai.transforms import apply_transform
from torch.utils.data import get_worker_info

__all__ = ["IMAGE_SUFFIXES", "image_datalist", "InferenceDataset"]

logger = logging.getLogger(__name__)

# what MONAI's LoadImage reads with nibabel or ITK
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def image_datalist(folder: str | Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[dict[str, str]]:
    """``[{"image": path}]`` for every image file in ``folder`` (not recursive), sorted by name.

    Args:
        folder: the input folder.
        suffixes: file endings that count as images (case-insensitive).

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a folder.
        ValueError: ``folder`` holds no image file (the message lists what it holds instead).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist or is not a folder.")
    ends = tuple(s.lower() for s in suffixes)
    files = sorted(
        p for p in root.iterdir() if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(ends)
    )
    if not files:
        others = sorted(p.name for p in root.iterdir())[:5]
        raise ValueError(
            f"no image ({', '.join('*' + s for s in suffixes)}) in {root}"
            + (f"; it holds {others}{'...' if len(others) == 5 else ''}." if others else "; it is empty.")
        )
    return [{"image": str(p)} for p in files]


class InferenceDataset(IterableDataset):
    """Apply ``transform`` to each item in turn; an item whose loading or transform fails is logged with its file
    name and the error, recorded in :attr:`failures`, and skipped, so one bad file does not stop a folder.

    Call :meth:`raise_if_failed` after the run (the bundles do it in ``finalize``) to exit non-zero with a
    summary of every failed file. Iterate with ``num_workers=0`` (the failures are recorded in this process).
    It has no ``len``: a workflow's epoch ends when the items run out, so a skipped file is not made up for by
    running another one twice.

    Args:
        data: items such as ``[{"image": path}]``.
        transform: the preprocessing.
        name_key: the item key that names the case in messages.
    """

    def __init__(self, data: Sequence[dict], transform: Callable | None = None, name_key: str = "image") -> None:
        super().__init__(data=data, transform=transform)
        self.name_key = name_key
        self.failures: list[tuple[str, str]] = []
        self.done = 0

    def __iter__(self) -> Iterator:
        if get_worker_info() is not None:
            raise RuntimeError(
                "InferenceDataset must be read with num_workers=0: worker processes would each yield every item and "
                "keep the failures to themselves."
            )
        self.failures, self.done = [], 0
        for item in self.data:
            name = str(item.get(self.name_key, item)) if isinstance(item, dict) else str(item)
            try:
                out = apply_transform(self.transform, item) if self.transform is not None else item
            except Exception as e:  # any reader or transform error: report the file, go on with the next
                cause = e
                while cause.__cause__ is not None:  # MONAI wraps the error of the failing transform
                    cause = cause.__cause__
                message = f"{type(cause).__name__}: {cause}".strip()
                self.failures.append((name, message))
                logger.error("skipping %s: %s", name, message)
                continue
            self.done += 1
            yield out

    def raise_if_failed(self) -> None:
        """Raise ``RuntimeError`` naming every file that failed in the last pass (nothing if none did)."""
        if not self.failures:
            return
        lines = "\n".join(f"  {name}: {message[:300]}" for name, message in self.failures)
        raise RuntimeError(f"{len(self.failures)} of {len(self.data)} input(s) failed ({self.done} done):\n{lines}")
