"""Validation during training that always includes the last epoch, and the starting model when it is calibrated."""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events
from monai.handlers import ValidationHandler

from monai_nacl.temperature.scaling import TemperatureScaled

__all__ = ["IntervalValidationHandler"]

logger = logging.getLogger(__name__)


class IntervalValidationHandler(ValidationHandler):
    """MONAI's ``ValidationHandler`` at epoch level: validate every ``interval`` epochs **and** after the last
    epoch, whatever ``max_epochs`` is, so a short run (e.g. 2 epochs of fine-tuning with ``interval=5``) still
    validates and saves its model.

    With ``validate_calibrated_start`` the starting model is validated too, before the first epoch, when it is a
    :class:`~monai_nacl.temperature.TemperatureScaled` whose temperature was fitted for its current weights: that
    is a run fine-tuning a calibrated model (MONAI Label loads ``model.pt`` before training). The model saver then
    knows how good the starting model is on this validation data, and a fine-tune replaces it only with a better
    one. A fresh network (never calibrated) or a resumed run (weights changed since) is not validated at start.

    Args:
        interval: validate every N epochs.
        validator: the evaluator to run.
        exec_at_start: always validate before training (MONAI's option).
        validate_calibrated_start: validate a calibrated starting model before training.

    Raises:
        ValueError: ``interval`` is not a positive integer.
    """

    def __init__(
        self, interval: int, validator=None, exec_at_start: bool = False, validate_calibrated_start: bool = True
    ) -> None:
        if isinstance(interval, bool) or int(interval) != interval or interval < 1:
            raise ValueError(f"interval must be a positive integer, got {interval!r}.")
        super().__init__(int(interval), validator, epoch_level=True, exec_at_start=exec_at_start)
        self.validate_calibrated_start = bool(validate_calibrated_start)

    def _due(self, engine: Engine, epoch: int) -> bool:
        return epoch % self.interval == 0 or epoch == engine.state.max_epochs

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=self._due), self)
        if self.exec_at_start:
            engine.add_event_handler(Events.STARTED, self)
        elif self.validate_calibrated_start:
            # after every STARTED handler (checkpoint loading, resume), before the first epoch of this run
            engine.add_event_handler(Events.EPOCH_STARTED(once=1), self._validate_if_calibrated)

    def _validate_if_calibrated(self, engine: Engine) -> None:
        network = getattr(self.validator, "network", None)
        network = getattr(network, "module", network)  # DistributedDataParallel
        if isinstance(network, TemperatureScaled) and network.is_calibrated_for_current_weights():
            logger.info("the starting model is calibrated for its weights: validating it before training")
            self.validator.run(engine.state.epoch - 1)  # the epoch count before this run's first epoch
