"""Epoch checkpoints that a killed training run resumes from."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

__all__ = ["ResumableCheckpoint", "latest_checkpoint"]

logger = logging.getLogger(__name__)
_STEP = re.compile(r"_checkpoint_(\d+)\.pt$")


def latest_checkpoint(save_dir: str | Path, prefix: str = "train") -> Path | None:
    """The ``{prefix}_checkpoint_{epoch}.pt`` file with the largest epoch in ``save_dir``, or ``None``."""
    found = []
    for p in Path(save_dir).glob(f"{prefix}_checkpoint_*.pt"):
        m = _STEP.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


class ResumableCheckpoint:
    """Save ``save_dict`` plus the trainer itself after every epoch; on attach, resume from the newest save.

    Checkpoints are written by ignite's ``DiskSaver(atomic=True)`` (temporary file, then rename), so a run
    killed at any moment leaves the last complete checkpoint; restarting the same command continues after
    the last finished epoch, with network, optimizer and trainer state (epoch, iteration) restored. The
    trainer is taken at attach time, which keeps bundle configs free of a trainer ↔ handler cycle.

    Args:
        save_dir: folder of the checkpoints (e.g. the bundle's ``models``).
        save_dict: objects with ``state_dict``/``load_state_dict`` (network, optimizer, scheduler...).
        file_prefix: checkpoint name prefix (``{prefix}_checkpoint_{epoch}.pt``).
        n_saved: how many epoch checkpoints to keep.
        resume: load the newest checkpoint when attached.
    """

    def __init__(
        self, save_dir: str | Path, save_dict: dict, file_prefix: str = "train", n_saved: int = 1, resume: bool = True
    ) -> None:
        if "trainer" in save_dict:
            raise ValueError("save_dict must not hold 'trainer': the engine it is attached to is added itself.")
        self.save_dir, self.save_dict, self.prefix = Path(save_dir), dict(save_dict), file_prefix
        self.n_saved, self.resume = n_saved, resume
        self.resumed_epoch = 0

    def attach(self, engine: Engine) -> None:
        to_save = {**self.save_dict, "trainer": engine}
        self.save_dir.mkdir(parents=True, exist_ok=True)
        saver = DiskSaver(str(self.save_dir), require_empty=False, atomic=True)
        checkpoint = Checkpoint(
            to_save,
            saver,
            filename_prefix=self.prefix,
            n_saved=self.n_saved,
            global_step_transform=lambda e, _: e.state.epoch,
        )
        engine.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
        if self.resume:
            self._load(engine, to_save)

    def _load(self, engine: Engine, to_load: dict) -> None:
        path = latest_checkpoint(self.save_dir, self.prefix)
        if path is None:
            return
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=to_load, checkpoint=torch.load(path, map_location="cpu", weights_only=True))
        engine.state.max_epochs = max_epochs  # the configured length wins, e.g. to extend a finished run
        self.resumed_epoch = int(engine.state.epoch)
        logger.warning("resuming from %s: epoch %d of %d done", path, engine.state.epoch, max_epochs)
