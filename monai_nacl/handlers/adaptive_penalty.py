"""Class-adaptive NACL: per-class penalty weights updated from validation by an augmented-Lagrangian rule."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import ignite.distributed as idist
import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.handlers import from_engine

from monai_nacl.input_checks import (
    as_tensor,
    check_bool,
    check_integer,
    check_logits,
    check_number,
    check_prior,
    labels_from_target,
)
from monai_nacl.losses.nacl import check_penalty_weight

__all__ = ["ClassAdaptivePenalty", "update_multipliers", "STATISTICS"]

logger = logging.getLogger(__name__)

STATISTICS = ("penalty", "prior_gap", "class_ece")
_LOGITS_AND_LABELS = from_engine(["logits", "label_index"])


def update_multipliers(
    multipliers: torch.Tensor | Sequence[float],
    constraints: torch.Tensor | Sequence[float],
    rho: float,
    lambda_min: float = 0.0,
    lambda_max: float = math.inf,
) -> torch.Tensor:
    """One multiplier step of the augmented Lagrangian (PHR) method, clipped: ``clip(λ + ρ g, λ_min, λ_max)``.

    For inequality constraints ``g_c <= 0`` the Powell-Hestenes-Rockafellar multiplier update is
    ``λ_c <- max(0, λ_c + ρ g_c)``: a violated constraint (``g_c > 0``) raises its multiplier, a satisfied one lowers
    it towards 0. The clip to ``[λ_min, λ_max]`` (``λ_min >= 0``) keeps the weights in a safe range, as the
    class-adaptive calibration methods do. A constraint that is NaN (no voxel measured it) leaves its multiplier
    unchanged.

    Args:
        multipliers: current ``λ`` (``C`` values).
        constraints: ``g`` (``C`` values; NaN where unmeasured).
        rho: step size (penalty parameter) ``ρ > 0``.
        lambda_min: lower clip (>= 0).
        lambda_max: upper clip (>= ``lambda_min``; ``inf`` for none).

    Returns:
        the new multipliers, float64.

    Raises:
        ValueError: different lengths, non-finite multipliers, or invalid ``rho`` / bounds.

    Example:
        >>> update_multipliers([0.25, 0.25, 0.5], [0.5, -0.25, 1.0], rho=0.5, lambda_max=0.75).tolist()
        [0.5, 0.125, 0.75]
    """
    lam, g = _float_vector(multipliers, "multipliers"), _float_vector(constraints, "constraints")
    if lam.shape != g.shape:
        raise ValueError(f"multipliers and constraints must have the same length, got {lam.numel()} and {g.numel()}.")
    if not bool(torch.isfinite(lam).all()):
        raise ValueError(f"multipliers must be finite, got {lam.tolist()}.")
    rho = check_number(rho, "rho", minimum=0.0, exclusive_minimum=True)
    lambda_min, lambda_max = _check_bounds(lambda_min, lambda_max)
    step = torch.where(torch.isnan(g), torch.zeros_like(g), rho * g)
    updated = (lam + step).clamp(lambda_min, lambda_max)
    return torch.where(torch.isnan(g), lam, updated)


def _float_vector(values, name: str) -> torch.Tensor:
    """``values`` (numbers, an array or a tensor) as a flat float64 tensor, or a ``ValueError`` naming ``name``."""
    try:
        return torch.as_tensor(values, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be numbers, got {values!r}.") from None


def _check_bounds(lambda_min: float, lambda_max: float) -> tuple[float, float]:
    lambda_min = check_number(lambda_min, "lambda_min", minimum=0.0)
    # +inf, however it is written (float, 0-d array or tensor), means no upper clip
    return lambda_min, check_number(lambda_max, "lambda_max", minimum=lambda_min, allow_infinity=True)


def _find_loss(loss):
    """The loss whose ``penalty_weight`` is adapted: ``loss`` itself or the first ``.loss`` down the wrappers."""
    seen, current = set(), loss
    while current is not None and id(current) not in seen:
        if hasattr(type(current), "penalty_weight") and hasattr(current, "num_classes"):
            return current
        seen.add(id(current))
        current = getattr(current, "loss", None)
    raise ValueError(
        f"loss ({type(loss).__name__}) has no per-class penalty_weight, neither itself nor a wrapped .loss: "
        "ClassAdaptivePenalty needs a NACLLoss (or a wrapper such as DeepSupervisionLoss holding one at .loss)."
    )


class ClassAdaptivePenalty:
    """Update NACL's per-class penalty weights ``λ_c`` after every validation round (class-adaptive NACL).

    Each class gets an inequality constraint on a validation statistic ``s_c``, ``g_c = s_c - margin_c <= 0``,
    and ``λ_c`` acts as its Lagrange multiplier: after each round,
    ``λ_c <- clip(λ_c + ρ g_c, λ_min, λ_max)`` (:func:`update_multipliers`, the PHR multiplier step of the
    augmented Lagrangian method). A class whose statistic is above its margin gets a stronger pull towards the
    neighbour prior; a class within its margin relaxes towards ``λ_min``. The result is written to
    ``loss.penalty_weight``, which :class:`~monai_nacl.losses.NACLLoss` reads at every call (no optimizer rebuild).

    Statistics (over the valid voxels of the whole validation set, every rank included; ``τ`` the neighbour prior,
    ``z`` the loss's penalised quantity, ``d`` its distance):

    * ``"penalty"`` (default): ``s_c = mean_i d(τ_ic, z_ic)``, the loss's own class-``c`` penalty term, so ``g_c``
      is exactly the constraint that ``λ_c`` weighs in the loss;
    * ``"prior_gap"``: ``s_c = mean_i |τ_ic - p_ic|`` with ``p = softmax(logits)`` (the same as ``"penalty"`` for
      ``penalty_on="softmax", distance="l1"``);
    * ``"class_ece"``: one-vs-rest expected calibration error of class ``c`` with ``num_bins`` equal-width bins,
      ``s_c = sum_m |sum_{i in m} p_ic - sum_{i in m} [y_i = c]| / N`` (no prior needed).

    The statistic is accumulated as sums over batches (``ITERATION_COMPLETED``), summed over ranks with
    ``ignite.distributed.all_reduce`` and turned into ``λ`` at ``EPOCH_COMPLETED`` of the engine it is attached to
    (the validation evaluator: one validation run is one round). Each round logs ``λ`` and ``s`` per class and, with
    ``name`` set, stores ``{name}_lambda_{c}`` and ``{name}_stat_{c}`` in ``engine.state.metrics`` (list this handler
    before ``StatsHandler`` to see this round's values there). ``state_dict``/``load_state_dict`` hold ``λ``: put the
    handler in the resume checkpoint's ``save_dict`` and a resumed run continues with the adapted weights.

    Multiplier rule: the class-adaptive calibration losses of Liu et al. (CALS, "Class Adaptive Network
    Calibration", CVPR 2023) and Murugesan et al. (CRaC, "Class and Region-Adaptive Constraints for Network
    Calibration", MICCAI 2024) learn one multiplier per class by an augmented Lagrangian whose multipliers are
    refreshed from validation statistics once per epoch and clipped to ``[λ_min, λ_max]``. They average the
    derivative of a penalty function over voxels; here the constraint is a class-level expectation, so the classical
    PHR step on the aggregated constraint is used: it is linear in the statistic (exact under sums over batches and
    ranks, hence reproducible in distributed runs), has one interpretable step size ``ρ``, and a multiplier moves
    only while its constraint is violated or slack.

    Args:
        loss: a :class:`~monai_nacl.losses.NACLLoss` or a wrapper holding one at ``.loss``.
        margin: allowed statistic per class (one value for all, or ``C`` values), >= 0; in the units of the
            statistic (``"penalty"`` on logits: logit units).
        rho: step size ``ρ > 0``.
        lambda_min, lambda_max: clip range of ``λ`` (``0 <= λ_min <= λ_max``).
        lambda_init: initial ``λ`` (one value or ``C`` values within the clip range); default: the loss's current
            ``penalty_weight``, or its ``alpha`` for every class (the loss value is then unchanged at the start).
        statistic: ``"penalty"``, ``"prior_gap"`` or ``"class_ece"``.
        num_bins: bins of ``"class_ece"`` (an integer >= 1).
        output_transform: maps ``engine.state.output`` to ``(logits, labels)`` or ``(logits, labels, prior)``: the
            network output before softmax and the labels (``B,1,*spatial``, ``B,*spatial`` or one-hot), as tensors
            or lists of per-case ``C,*spatial`` / ``1,*spatial`` tensors. Without a prior, τ is computed from the
            labels with the loss's kernel, kernel size, padding and ignore index (``loss.prior``); pass the prior
            when training uses another one (e.g. ``NeighborPriord(neighborhood_mm=...)``), or use ``prior_key``.
        prior_key: read the prior from ``engine.state.batch[prior_key]`` (a batched tensor or, after MONAI's
            decollation, one ``C,*spatial`` tensor per case), e.g. from ``NeighborPriord`` in the validation
            preprocessing: MONAI evaluators do not copy batch keys into their output. Not with a 3-item
            ``output_transform``.
        name: prefix of the metrics written to ``engine.state.metrics`` (``None``: none written).
        enabled: ``False`` makes the handler a no-op that attaches nothing and leaves the loss alone.

    Raises:
        ValueError: an unknown ``statistic``; ``margin``, ``rho``, the bounds, ``lambda_init`` or ``num_bins``
            invalid (each message names the argument); ``lambda_init`` outside ``[lambda_min, lambda_max]``; a
            ``loss`` without per-class penalty weights; at run time, bad logits/labels/prior (named).

    Example (bundle config: the handler in ``validate#handlers``, and in the resume ``save_dict``)::

        "adaptive_penalty": {"_target_": "monai_nacl.handlers.ClassAdaptivePenalty", "loss": "@loss",
                             "margin": 0.5, "rho": 0.05, "lambda_max": 1.0,
                             "output_transform": "$monai.handlers.from_engine(['logits', 'label_index'])"}

    Example:
        >>> from monai_nacl.losses import NACLLoss
        >>> loss = NACLLoss(3, alpha=0.25)
        >>> handler = ClassAdaptivePenalty(loss, margin=0.25, rho=0.5, lambda_max=0.5)
        >>> loss.penalty_weight.tolist()
        [0.25, 0.25, 0.25]
        >>> handler.step([0.125, 0.5, 1.0]).tolist()  # g = s - margin = [-0.125, 0.25, 0.75]
        [0.1875, 0.375, 0.5]
        >>> loss.penalty_weight.tolist()
        [0.1875, 0.375, 0.5]
    """

    def __init__(
        self,
        loss,
        margin: float | Sequence[float],
        rho: float = 0.1,
        lambda_min: float = 0.0,
        lambda_max: float = 1.0,
        lambda_init: float | Sequence[float] | None = None,
        statistic: str = "penalty",
        num_bins: int = 15,
        output_transform: Callable = _LOGITS_AND_LABELS,
        name: str | None = "adaptive_penalty",
        enabled: bool = True,
        prior_key: str | None = None,
    ) -> None:
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}.")
        if not callable(output_transform):
            raise ValueError(f"output_transform must be callable, got {type(output_transform).__name__}.")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"name must be a string or None, got {name!r} ({type(name).__name__}).")
        self.statistic = statistic
        self.rho = check_number(rho, "rho", minimum=0.0, exclusive_minimum=True)
        self.lambda_min, self.lambda_max = _check_bounds(lambda_min, lambda_max)
        self.num_bins = check_integer(num_bins, "num_bins", minimum=1)
        if prior_key is not None and not isinstance(prior_key, str):
            raise ValueError(f"prior_key must be a string or None, got {prior_key!r} ({type(prior_key).__name__}).")
        self.output_transform, self.name, self.prior_key = output_transform, name, prior_key
        self.enabled = check_bool(enabled, "enabled")
        self.loss = loss
        self.target = _find_loss(loss)
        self.num_classes = int(self.target.num_classes)
        self.margin = self._per_class(margin, "margin")
        if lambda_init is None:
            current = self.target.penalty_weight
            lam = current if current is not None else [float(self.target.alpha)] * self.num_classes
            lam = check_penalty_weight(lam, self.num_classes, "lambda_init")
        else:
            lam = self._per_class(lambda_init, "lambda_init")
        if bool((lam < self.lambda_min).any()) or bool((lam > self.lambda_max).any()):
            raise ValueError(
                f"lambda_init must lie in [lambda_min, lambda_max] = [{self.lambda_min}, {self.lambda_max}], "
                f"got {lam.tolist()} (from {'the loss' if lambda_init is None else 'lambda_init'})."
            )
        self.penalty_weight = lam
        self.rounds = 0
        self.last_statistic: torch.Tensor | None = None
        self.reset()
        if self.enabled:
            self.target.penalty_weight = lam

    def _per_class(self, value, name: str) -> torch.Tensor:
        """One value or ``C`` values >= 0 as a float64 tensor of ``C``."""
        if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
            value = value.item()  # one value for all classes, like a Python or NumPy scalar
        if isinstance(value, (Sequence, torch.Tensor, np.ndarray)) and not isinstance(value, str):
            return check_penalty_weight(value, self.num_classes, name)
        return torch.full((self.num_classes,), check_number(value, name, minimum=0.0), dtype=torch.float64)

    # ------------------------------------------------------------------ statistics

    def reset(self) -> None:
        """Clear the sums of the current round."""
        shape = (self.num_classes, self.num_bins, 2) if self.statistic == "class_ece" else (self.num_classes,)
        self._sums = torch.zeros(shape, dtype=torch.float64)
        self._count = torch.zeros((), dtype=torch.float64)

    def update(self, logits, labels, prior=None) -> None:
        """Add one batch (tensors ``B,…`` or lists of per-case tensors) to the round's sums.

        Raises:
            ValueError: logits that are not ``B,C,*spatial`` floating tensors with ``C = num_classes``; bad labels or
                prior (as :class:`~monai_nacl.losses.NACLLoss` reports them); non-finite logits or prior (named);
                lists of different lengths.
        """
        if isinstance(logits, (list, tuple)):
            same = [isinstance(v, (list, tuple)) and len(v) == len(logits) for v in (labels, prior) if v is not None]
            if not all(same):
                raise ValueError("logits given as a list need labels (and prior, if any) as lists of the same length.")
            for i, x in enumerate(logits):
                p = None if prior is None else as_tensor(prior[i])[None]
                self._update_batch(as_tensor(x)[None], as_tensor(labels[i])[None], p)
        else:
            self._update_batch(as_tensor(logits), as_tensor(labels), None if prior is None else as_tensor(prior))

    @torch.no_grad()
    def _update_batch(self, logits: torch.Tensor, target: torch.Tensor, prior: torch.Tensor | None) -> None:
        loss = self.target
        check_logits(logits, self.num_classes, name="logits")
        x = logits.detach()
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        ignore_index = getattr(loss, "ignore_index", None)
        target = as_tensor(target)
        target = target.to(x.device) if isinstance(target, torch.Tensor) else target  # others: named by the check
        labels = labels_from_target(target, x, self.num_classes, ignore_index)
        valid = (labels != ignore_index) if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
        n_valid = valid.sum(dtype=torch.float64)
        if self.statistic == "class_ece":
            p = F.softmax(x, 1)
            hit = F.one_hot(torch.where(valid, labels, 0).long()[:, 0], self.num_classes).movedim(-1, 1).to(p.dtype)
            bins = (p * self.num_bins).long().clamp_(0, self.num_bins - 1)
            offset = torch.arange(self.num_classes, device=p.device).view(1, -1, *([1] * (p.ndim - 2)))
            flat = (bins + offset * self.num_bins).expand_as(p)[valid.expand_as(p)]
            sums = torch.stack(
                [
                    torch.bincount(flat, p[valid.expand_as(p)].double(), self.num_classes * self.num_bins),
                    torch.bincount(flat, hit[valid.expand_as(p)].double(), self.num_classes * self.num_bins),
                ],
                -1,
            ).view(self.num_classes, self.num_bins, 2)
        else:
            if prior is None:
                if not hasattr(loss, "prior"):
                    raise ValueError(
                        f"{type(loss).__name__} cannot compute the prior: return (logits, labels, prior) from "
                        "output_transform."
                    )
                tau = loss.prior(labels, x.dtype)
            else:
                tau = check_prior(prior.to(x.device), x).to(x.dtype)
            tau = tau.to(x.device)
            if self.statistic == "prior_gap" or getattr(loss, "penalty_on", "logits") == "softmax":
                z = F.softmax(x, 1)
            else:
                z = x
            diff = z - tau
            if self.statistic == "penalty" and getattr(loss, "distance", "l1") == "l2":
                d = diff.square()
            else:
                d = diff.abs()
            d = d * valid
            sums = d.sum(dim=[0, *range(2, d.ndim)], dtype=torch.float64)
        sums = sums.cpu()
        if not bool(torch.isfinite(sums).all()):
            culprit = "logits" if not bool(torch.isfinite(x).all()) else "prior"
            raise ValueError(
                f"ClassAdaptivePenalty: non-finite {culprit} (NaN or Inf) in this batch; the statistic would be NaN."
            )
        self._sums += sums
        self._count += n_valid.cpu()

    def compute(self) -> torch.Tensor:
        """The round's per-class statistic (``C`` values, float64), summed over ranks; NaN when no voxel counted."""
        flat = torch.cat([self._sums.flatten(), self._count.view(1)])
        if idist.get_world_size() > 1:
            flat = idist.all_reduce(flat.clone())
        flat = flat.cpu()
        sums, count = flat[:-1].view(self._sums.shape), float(flat[-1])
        if count <= 0:
            return torch.full((self.num_classes,), math.nan, dtype=torch.float64)
        if self.statistic == "class_ece":
            return (sums[..., 0] - sums[..., 1]).abs().sum(1) / count
        return sums / count

    # ------------------------------------------------------------------ multiplier update

    def step(self, statistic: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Apply one multiplier update for the per-class ``statistic``, set it on the loss, and return the new ``λ``.

        Raises:
            ValueError: ``statistic`` does not hold ``C`` values.
        """
        s = _float_vector(statistic, "statistic")
        if s.numel() != self.num_classes:
            raise ValueError(f"statistic must hold {self.num_classes} values, got {s.numel()}.")
        lam = update_multipliers(self.penalty_weight, s - self.margin, self.rho, self.lambda_min, self.lambda_max)
        self.penalty_weight, self.last_statistic = lam, s
        self.rounds += 1
        if self.enabled:
            self.target.penalty_weight = lam
        return lam

    # ------------------------------------------------------------------ ignite

    def attach(self, engine: Engine) -> None:
        """Reset at ``EPOCH_STARTED``, accumulate at ``ITERATION_COMPLETED``, update at ``EPOCH_COMPLETED``."""
        if not self.enabled:
            return
        if not engine.has_event_handler(self._started, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self._started)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self.reset()

    def _iteration(self, engine: Engine) -> None:
        out = self.output_transform(engine.state.output)
        if not isinstance(out, (list, tuple)) or len(out) not in (2, 3):
            raise ValueError(
                "ClassAdaptivePenalty: output_transform must return (logits, labels) or (logits, labels, prior)."
            )
        if self.prior_key is not None:
            if len(out) == 3:
                raise ValueError("ClassAdaptivePenalty: prior_key is set, so output_transform must return 2 items.")
            out = (*out, self._prior_from_batch(engine.state.batch))
        self.update(*out)

    def _prior_from_batch(self, batch):
        """``batch[prior_key]``, or one prior per case of a decollated batch."""
        items = batch if isinstance(batch, (list, tuple)) else [batch]
        for item in items:
            if not isinstance(item, dict) or self.prior_key not in item:
                keys = sorted(item) if isinstance(item, dict) else type(item).__name__
                raise KeyError(
                    f"ClassAdaptivePenalty: the batch has no '{self.prior_key}' (keys: {keys}); add NeighborPriord to "
                    "the validation preprocessing or drop prior_key."
                )
        return [item[self.prior_key] for item in items] if isinstance(batch, (list, tuple)) else batch[self.prior_key]

    def _completed(self, engine: Engine) -> None:
        s = self.compute()
        if bool(torch.isnan(s).all()):
            logger.warning("ClassAdaptivePenalty: no valid voxel in this round; penalty weights unchanged.")
        lam = self.step(s)
        logger.info(
            "ClassAdaptivePenalty round %d (%s): statistic %s, margin %s -> penalty_weight %s",
            self.rounds,
            self.statistic,
            [round(v, 5) for v in s.tolist()],
            [round(v, 5) for v in self.margin.tolist()],
            [round(v, 6) for v in lam.tolist()],
        )
        if self.name is not None:
            for c in range(self.num_classes):
                engine.state.metrics[f"{self.name}_lambda_{c}"] = float(lam[c])
                engine.state.metrics[f"{self.name}_stat_{c}"] = float(s[c])

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict:
        """``penalty_weight`` (list of ``C`` floats), ``rounds`` and the last statistic (``None`` before a round)."""
        return {
            "penalty_weight": self.penalty_weight.tolist(),
            "rounds": self.rounds,
            "last_statistic": None if self.last_statistic is None else self.last_statistic.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``λ`` (and set it on the loss), the round count and the last statistic.

        Raises:
            ValueError: a state without ``penalty_weight``, or one with a wrong class count or invalid values.
                Weights outside ``[lambda_min, lambda_max]`` (bounds changed since) are clipped, with a warning.
        """
        if not isinstance(state, dict) or "penalty_weight" not in state:
            raise ValueError(f"state must be a dict with 'penalty_weight', got {type(state).__name__}.")
        lam = check_penalty_weight(state["penalty_weight"], self.num_classes, "state['penalty_weight']")
        clipped = lam.clamp(self.lambda_min, self.lambda_max)
        if not torch.equal(clipped, lam):
            # the bounds were changed since the checkpoint was written: the next round would clip them too
            logger.warning(
                "ClassAdaptivePenalty: the checkpoint's weights %s lie outside [lambda_min, lambda_max] = [%s, %s]; "
                "resuming with %s.",
                lam.tolist(),
                self.lambda_min,
                self.lambda_max,
                clipped.tolist(),
            )
        rounds = check_integer(state.get("rounds", 0), "state['rounds']", minimum=0)
        last = state.get("last_statistic")
        if last is not None:
            # NaN where a round saw no voxel of a class: step() keeps that class's weight, and saves it so
            last = _float_vector(last, "state['last_statistic']")
            if last.numel() != self.num_classes:
                raise ValueError(f"state['last_statistic'] must hold {self.num_classes} values, got {last.numel()}.")
        self.penalty_weight, self.rounds, self.last_statistic = clipped, rounds, last
        if self.enabled:
            self.target.penalty_weight = clipped
