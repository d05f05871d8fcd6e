"""Epoch checkpoints that a killed training run resumes from."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from monai_nacl.temperature.scaling import StaleTemperatureWarning

__all__ = ["ResumableCheckpoint", "latest_checkpoint"]

logger = logging.getLogger(__name__)
_STEP = re.compile(r"_checkpoint_(\d+)\.pt$")
# scheduler settings that follow the configured run length rather than the checkpoint
_SCHEDULE_LENGTH = ("T_max", "total_iters")


def latest_checkpoint(save_dir: str | Path, prefix: str = "train") -> Path | None:
    """The ``{prefix}_checkpoint_{epoch}.pt`` file with the largest epoch in ``save_dir``, or ``None``."""
    found = []
    for p in Path(save_dir).glob(f"{prefix}_checkpoint_*.pt"):
        m = _STEP.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


class ResumableCheckpoint:
    """Save ``save_dict`` plus the trainer itself after every epoch; resume an interrupted run from the newest save.

    Checkpoints are written by ignite's ``DiskSaver(atomic=True)`` (temporary file, then rename), so a run killed
    at any moment leaves the last complete checkpoint. The newest checkpoint is loaded when the trainer starts
    (``Events.STARTED``), after any handler attached before this one — e.g. the ``CheckpointLoader`` that MONAI Label
    inserts to fine-tune from ``model.pt`` — so an interrupted run continues with its own network, optimizer,
    scheduler, trainer state and whatever else ``save_dict`` holds (e.g. a
    :class:`~monai_nacl.handlers.CalibratedModelSaver` and its best metric). When the run completes its checkpoints
    are deleted: the product of a finished run is its model, and the next run (or fine-tune) starts afresh.

    Keep ``save_dir`` apart from the model folder (the bundles use ``<ckpt_dir>_resume``, e.g. ``models_resume/``): tools that list models, such
    as MONAI Label, would otherwise offer the checkpoints as models.

    The configured run wins over the checkpoint: ``max_epochs`` and the schedule length of LR schedulers in
    ``save_dict`` (``T_max``, ``total_iters``) keep their configured values, so raising ``max_epochs`` extends an
    interrupted run with a schedule that fits it.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects with ``state_dict``/``load_state_dict`` (network, optimizer, scheduler, model saver...).
        file_prefix: checkpoint name prefix (``{prefix}_checkpoint_{epoch}.pt``).
        n_saved: how many epoch checkpoints to keep (older ones are deleted).
        resume: load the newest checkpoint when the trainer starts.
        keep_when_complete: keep the checkpoints of a completed run instead of deleting them.

    Raises:
        ValueError: ``save_dict`` holds ``"trainer"``; at start, the checkpoint is past ``max_epochs`` (the message
            names the checkpoint and both epochs).
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_dict: dict,
        file_prefix: str = "train",
        n_saved: int = 1,
        resume: bool = True,
        keep_when_complete: bool = False,
    ) -> None:
        if "trainer" in save_dict:
            raise ValueError("save_dict must not hold 'trainer': the engine it is attached to is added itself.")
        self.save_dir, self.save_dict, self.prefix = Path(save_dir), dict(save_dict), file_prefix
        self.n_saved, self.resume, self.keep_when_complete = n_saved, resume, keep_when_complete
        self.resumed_epoch = 0
        self.resumed_from: Path | None = None

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
            engine.add_event_handler(Events.STARTED, self._load, to_save)
        if not self.keep_when_complete:
            engine.add_event_handler(Events.COMPLETED, self._remove_when_finished)

    def _load(self, engine: Engine, to_load: dict) -> None:
        path = latest_checkpoint(self.save_dir, self.prefix)
        if path is None:
            return
        max_epochs = engine.state.max_epochs
        lengths = {
            name: {a: getattr(obj, a) for a in _SCHEDULE_LENGTH if hasattr(obj, a)}
            for name, obj in to_load.items()
            if isinstance(obj, torch.optim.lr_scheduler.LRScheduler)
        }
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign files raise several types
            raise ValueError(
                f"cannot resume from {path} ({type(e).__name__}: {e}); delete it to start the run afresh."
            ) from e
        with warnings.catch_warnings():
            # the live network of a fine-tune keeps the fingerprint of the weights it started from: training state,
            # not a served model, so no StaleTemperatureWarning
            warnings.simplefilter("ignore", StaleTemperatureWarning)
            Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint)
        done = int(engine.state.epoch)
        engine.state.max_epochs = max_epochs  # the configured length wins, e.g. to extend an interrupted run
        for name, attrs in lengths.items():
            for attr, value in attrs.items():
                setattr(to_load[name], attr, value)
        if done > max_epochs:
            raise ValueError(
                f"{path} is at epoch {done}, past max_epochs={max_epochs}: raise max_epochs to continue that run, or "
                "delete the checkpoint to start a new one."
            )
        self.resumed_epoch, self.resumed_from = done, path
        if done == max_epochs:
            logger.warning("%s is at epoch %d of %d: nothing left to train", path, done, max_epochs)
        else:
            logger.warning("resuming from %s: epoch %d of %d done", path, done, max_epochs)

    def _remove_when_finished(self, engine: Engine) -> None:
        if engine.state.epoch < engine.state.max_epochs or idist.get_rank() != 0:
            return
        for p in self.save_dir.glob(f"{self.prefix}_checkpoint_*.pt"):
            p.unlink(missing_ok=True)
        logger.info("run complete: removed its resume checkpoints from %s", self.save_dir)
