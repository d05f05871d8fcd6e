"""Validation during training that always includes the last epoch."""

from __future__ import annotations

from ignite.engine import Engine, Events
from monai.handlers import ValidationHandler

__all__ = ["IntervalValidationHandler"]


class IntervalValidationHandler(ValidationHandler):
    """MONAI's ``ValidationHandler`` at epoch level: validate every ``interval`` epochs **and** after the last
    epoch, whatever ``max_epochs`` is, so a short run (e.g. 2 epochs of fine-tuning with ``interval=5``) still
    validates and saves its model.

    Args:
        interval: validate every N epochs.
        validator: the evaluator to run.
        exec_at_start: also validate before training.

    Raises:
        ValueError: ``interval`` is not a positive integer.
    """

    def __init__(self, interval: int, validator=None, exec_at_start: bool = False) -> None:
        if isinstance(interval, bool) or int(interval) != interval or interval < 1:
            raise ValueError(f"interval must be a positive integer, got {interval!r}.")
        super().__init__(int(interval), validator, epoch_level=True, exec_at_start=exec_at_start)

    def _due(self, engine: Engine, epoch: int) -> bool:
        return epoch % self.interval == 0 or epoch == engine.state.max_epochs

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=self._due), self)
        if self.exec_at_start:
            engine.add_event_handler(Events.STARTED, self)
