"""Hand the transform's neighbour prior to the loss inside MONAI's ``SupervisedTrainer``."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

from monai_nacl.input_checks import check_bool

__all__ = ["PriorFromBatch"]


class PriorFromBatch:
    """Pass ``batch[key]`` (τ from :class:`~monai_nacl.transforms.NeighborPriord`) to the loss each iteration.

    ``SupervisedTrainer`` calls ``loss_function(pred, label)`` only. This handler runs after the forward
    pass (``IterationEvents.FORWARD_COMPLETED``, just before the loss) and calls
    ``loss.use_prior_once(batch[key])``, so the loss reads the full-volume prior instead of recomputing it.
    Without this handler the loss still works, computing τ on the patch.

    Args:
        loss: a loss with ``use_prior_once`` (:class:`~monai_nacl.losses.NACLLoss`).
        key: batch key of the prior.
        enabled: ``False`` makes the handler a no-op that attaches nothing (a bundle override can then switch the
            prior off by name, e.g. for a baseline loss without one).

    Raises:
        ValueError: (constructor) ``loss`` has no ``use_prior_once``.
        KeyError: when the batch has no ``key`` (add ``NeighborPriord`` to the train transforms).
        ValueError: when ``batch[key]`` is not a tensor (e.g. a list of per-sample priors left uncollated).
    """

    def __init__(self, loss, key: str = "prior", enabled: bool = True) -> None:
        self.enabled = check_bool(enabled, "enabled")
        if self.enabled and not hasattr(loss, "use_prior_once"):
            raise ValueError(f"{type(loss).__name__} cannot take a prior (no use_prior_once method).")
        self.loss, self.key = loss, key

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        batch = engine.state.batch
        if self.key not in batch:
            raise KeyError(f"PriorFromBatch: the batch has no '{self.key}' (keys: {sorted(batch)}).")
        prior = batch[self.key]
        if not isinstance(prior, torch.Tensor):
            raise ValueError(
                f"PriorFromBatch: batch['{self.key}'] must be a tensor B,C,*spatial, got {type(prior).__name__} "
                "(collate the priors like the images)."
            )
        self.loss.use_prior_once(prior.to(engine.state.device, non_blocking=engine.non_blocking))
