"""Hand the transform's neighbour prior to the loss inside MONAI's ``SupervisedTrainer``."""

from __future__ import annotations

from ignite.engine import Engine
from monai.engines.utils import IterationEvents

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

    Raises:
        KeyError: when the batch has no ``key`` (add ``NeighborPriord`` to the train transforms).
    """

    def __init__(self, loss, key: str = "prior") -> None:
        if not hasattr(loss, "use_prior_once"):
            raise ValueError(f"{type(loss).__name__} cannot take a prior (no use_prior_once method).")
        self.loss, self.key = loss, key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        batch = engine.state.batch
        if self.key not in batch:
            raise KeyError(f"PriorFromBatch: the batch has no '{self.key}' (keys: {sorted(batch)}).")
        self.loss.use_prior_once(batch[self.key].to(engine.state.device, non_blocking=engine.non_blocking))
