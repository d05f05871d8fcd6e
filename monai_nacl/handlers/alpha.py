"""An epoch schedule for NACL's penalty weight ``alpha``."""

from __future__ import annotations

import math

from ignite.engine import Engine, Events

from monai_nacl.input_checks import check_bool, check_integer, check_number

__all__ = ["AlphaSchedule"]

SCHEDULES = ("linear", "cosine", "step")


class AlphaSchedule:
    """Set ``loss.alpha`` at the start of every training epoch from a warm-up + ramp schedule.

    With ``e = engine.state.epoch - 1`` (the 0-based index of the epoch that is starting) and the ramp progress
    ``f = clip((e - warmup_epochs) / ramp_epochs, 0, 1)`` (``ramp_epochs=0``: ``f = 1`` from epoch
    ``warmup_epochs`` on, a single jump):

    * ``"linear"``: ``alpha = start + (end - start) * f``;
    * ``"cosine"``: ``alpha = start + (end - start) * (1 - cos(pi f)) / 2`` (slow start and finish);
    * ``"step"``: ``alpha = start + (end - start) * floor(f * num_steps) / num_steps`` (``num_steps`` equal
      stairs; the default 1 keeps ``start`` for ``warmup_epochs + ramp_epochs`` epochs, then ``end``).

    So the first ``warmup_epochs`` epochs use ``start_alpha``, and epoch index ``warmup_epochs + ramp_epochs``
    (1-based epoch ``warmup_epochs + ramp_epochs + 1``) and later use ``end_alpha``.

    The value is a function of ``engine.state.epoch`` alone, set at ``Events.EPOCH_STARTED``: a trainer resumed
    from a checkpoint (ignite restores ``state.epoch``) continues the schedule where it stopped, with no state of
    its own to save. The loss may be a :class:`~monai_nacl.losses.NACLLoss` or any loss with a float ``alpha``
    attribute, or a wrapper holding one at ``.loss`` (e.g. :class:`~monai_nacl.losses.DeepSupervisionLoss`, nested
    wrappers too). ``NACLLoss`` reads ``self.alpha`` at every call, so setting it between iterations is safe.

    Args:
        loss: the loss (or wrapper) whose ``alpha`` is scheduled.
        schedule: ``"linear"``, ``"cosine"`` or ``"step"``.
        start_alpha: alpha during warm-up (finite, >= 0).
        end_alpha: alpha after the ramp (finite, >= 0; may be below ``start_alpha`` for a decreasing schedule).
        warmup_epochs: epochs at ``start_alpha`` (an integer >= 0).
        ramp_epochs: epochs from ``start_alpha`` to ``end_alpha`` (an integer >= 0).
        num_steps: stairs of the ``"step"`` schedule (an integer >= 1; ignored by the others).
        enabled: ``False`` makes the handler a no-op that attaches nothing (for a bundle override).

    Raises:
        ValueError: an unknown ``schedule``; an invalid number or ``enabled`` (each message names the argument); a
            ``loss`` without an ``alpha`` attribute, directly or at ``.loss``; a loss whose per-class
            ``penalty_weight`` replaces ``alpha`` (checked again at every epoch start).

    Example (bundle config, ``train#handlers``)::

        {"_target_": "monai_nacl.handlers.AlphaSchedule", "loss": "@loss", "schedule": "cosine",
         "start_alpha": 0.0, "end_alpha": 0.1, "warmup_epochs": 5, "ramp_epochs": 20}

    Example:
        >>> from monai_nacl.losses import NACLLoss
        >>> sched = AlphaSchedule(NACLLoss(3), "linear", end_alpha=0.2, warmup_epochs=1, ramp_epochs=2)
        >>> [round(sched.value(epoch), 3) for epoch in range(5)]
        [0.0, 0.0, 0.1, 0.2, 0.2]
    """

    def __init__(
        self,
        loss,
        schedule: str = "linear",
        start_alpha: float = 0.0,
        end_alpha: float = 0.1,
        warmup_epochs: int = 0,
        ramp_epochs: int = 10,
        num_steps: int = 1,
        enabled: bool = True,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
        self.schedule = schedule
        self.start_alpha = check_number(start_alpha, "start_alpha", minimum=0.0)
        self.end_alpha = check_number(end_alpha, "end_alpha", minimum=0.0)
        self.warmup_epochs = check_integer(warmup_epochs, "warmup_epochs", minimum=0)
        self.ramp_epochs = check_integer(ramp_epochs, "ramp_epochs", minimum=0)
        self.num_steps = check_integer(num_steps, "num_steps", minimum=1)
        self.enabled = check_bool(enabled, "enabled")
        self.loss = loss
        self.target = self._find_target(loss) if self.enabled else None
        self.last_alpha: float | None = None
        if self.target is not None:
            self._check_alpha_is_used()

    def _check_alpha_is_used(self) -> None:
        """Per-class penalty weights (``penalty_weight=``, or a ``ClassAdaptivePenalty`` on the same loss) replace
        ``alpha``: a schedule of ``alpha`` would then change nothing, silently."""
        if getattr(self.target, "penalty_weight", None) is not None:
            raise ValueError(
                f"the loss ({type(self.target).__name__}) has per-class penalty weights set (penalty_weight, e.g. by "
                "ClassAdaptivePenalty), which replace alpha: AlphaSchedule would change nothing. Use one of the two."
            )

    @staticmethod
    def _find_target(loss):
        """The module whose ``alpha`` is set: ``loss`` itself or the first ``.loss`` down the wrappers."""
        seen, current = set(), loss
        while current is not None and id(current) not in seen:
            if isinstance(getattr(current, "alpha", None), (int, float)) and not isinstance(current.alpha, bool):
                return current
            seen.add(id(current))
            current = getattr(current, "loss", None)
        raise ValueError(
            f"loss ({type(loss).__name__}) has no float alpha attribute, neither itself nor a wrapped .loss: "
            "AlphaSchedule needs a NACLLoss (or a wrapper such as DeepSupervisionLoss holding one at .loss)."
        )

    def value(self, epoch_index: int) -> float:
        """Alpha for the epoch with 0-based index ``epoch_index`` (``engine.state.epoch - 1`` when it starts)."""
        e = epoch_index - self.warmup_epochs
        if self.ramp_epochs == 0:
            f = 1.0 if e >= 0 else 0.0
        else:
            f = min(max(e / self.ramp_epochs, 0.0), 1.0)
        if self.schedule == "cosine":
            f = (1.0 - math.cos(math.pi * f)) / 2.0
        elif self.schedule == "step":
            f = math.floor(f * self.num_steps) / self.num_steps
        return self.start_alpha + (self.end_alpha - self.start_alpha) * f

    def attach(self, engine: Engine) -> None:
        """Set alpha at every ``EPOCH_STARTED`` of ``engine`` (nothing when ``enabled=False``)."""
        if not self.enabled:
            return
        if not engine.has_event_handler(self, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self._check_alpha_is_used()  # a ClassAdaptivePenalty may have been attached after this schedule was built
        alpha = float(self.value(engine.state.epoch - 1))
        self.target.alpha = alpha
        self.last_alpha = alpha
