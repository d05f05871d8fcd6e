"""Split-conformal methods on top of calibrated segmentation probabilities.

Three methods, each fitted on a calibration split of labelled cases and then applied to new cases (definitions and
guarantees in ``docs/conformal.md``). The exchangeable unit is the **case** (a labelled volume): voxels of one volume
are correlated, so every finite-sample correction below counts cases, never voxels.

* :class:`ConformalPredictionSets` -- voxel-wise prediction sets (LAC score ``1 - p_true``, or APS), never empty (the
  argmax class is always in). Guarantee: the expected fraction of a new case's voxels whose set holds the true class
  is at least ``1 - alpha`` (conformal risk control with the per-case miscoverage fraction as the loss).
* :class:`ConformalRiskControl` -- per structure, an *outer* mask ``{p_c >= t_out}`` whose expected false-negative
  rate is at most ``alpha`` and an *inner* mask ``{p_c >= t_in}`` whose expected false-positive volume (relative to
  the structure's true volume, clipped at 1) is at most ``alpha`` (conformal risk control, Angelopoulos et al. 2022).
* :class:`ConformalVolumeIntervals` -- per case and structure, an interval for the structure's volume in mL that
  holds the true volume with probability ``>= 1 - alpha`` (conformalised normalised residuals of the expected volume).

Every fitted object stores plain floats and tensors: ``state_dict()`` / ``load_state_dict()`` and ``to_json()`` /
``from_json()`` keep it beside a model's weights (``monai_nacl.conformal.record``). The guarantees assume the
calibration cases and the new case are exchangeable (e.g. drawn i.i.d. from the same population and scanned alike),
and are marginal: on average over calibration sets and new cases.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import torch

from monai_nacl.distributed import all_gather_rows, all_reduce_sum, world_size
from monai_nacl.input_checks import (
    as_tensor,
    check_integer,
    check_num_classes,
    check_number,
    check_probabilities,
    labels_from_target,
)

__all__ = [
    "conformal_quantile_index",
    "conformal_quantile",
    "case_conformal_quantile",
    "crc_threshold_index",
    "ConformalPredictionSets",
    "ConformalRiskControl",
    "ConformalVolumeIntervals",
]


def _check_alpha(alpha: object) -> float:
    return check_number(alpha, "alpha", minimum=0.0, maximum=1.0, exclusive_minimum=True, exclusive_maximum=True)


def conformal_quantile_index(n: int, alpha: float) -> int:
    """The rank ``k = ceil((n + 1)(1 - alpha))`` of the split-conformal quantile among ``n`` scores.

    Equivalently the empirical quantile at level ``k / n``; ``k > n`` means the threshold is ``+inf``. A relative
    ``1e-12`` is subtracted before the ceiling so that ``(19 + 1) * 0.9`` is 18, not 19 through rounding.

    Args:
        n: number of calibration scores (>= 1).
        alpha: miscoverage level in ``(0, 1)``.

    Returns:
        ``k`` (1-based rank; may exceed ``n``).

    Raises:
        ValueError: ``n < 1`` (empty calibration set) or ``alpha`` outside ``(0, 1)``.

    Example:
        >>> conformal_quantile_index(19, 0.1)
        18
    """
    alpha = _check_alpha(alpha)
    n = check_integer(n, "n")
    if n < 1:
        raise ValueError("the calibration set is empty (n = 0 scores): call update() with labelled cases first.")
    x = (n + 1) * (1.0 - alpha)
    return math.ceil(x - 1e-12 * x)


def conformal_quantile(scores: torch.Tensor, alpha: float) -> float:
    """The split-conformal threshold: the ``ceil((n + 1)(1 - alpha))``-th smallest of ``n`` scores, ``+inf`` if
    that rank exceeds ``n``.

    Args:
        scores: 1-D (or any shape, flattened) finite calibration scores.
        alpha: miscoverage level in ``(0, 1)``.

    Returns:
        the threshold ``q``; a new score is ``<= q`` with probability ``>= 1 - alpha`` under exchangeability.

    Raises:
        ValueError: empty ``scores``, NaN/Inf scores, ``alpha`` outside ``(0, 1)``.

    Example:
        >>> conformal_quantile(torch.arange(1.0, 20.0), 0.1)  # 19 scores: the 18th smallest
        18.0
    """
    s = as_tensor(torch.as_tensor(scores)).detach().flatten()
    k = conformal_quantile_index(int(s.numel()), alpha)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores contain NaN or Inf.")
    if k > s.numel():
        return math.inf
    return float(torch.kthvalue(s.double().cpu(), k).values)


def case_conformal_quantile(case_scores: Sequence[torch.Tensor], alpha: float) -> float:
    """The smallest threshold ``q`` whose expected per-case miscoverage is controlled at ``alpha`` with the cases
    (not the scores) exchangeable.

    Case ``i`` has ``m_i`` scores; its loss at ``q`` is the fraction of them above ``q``, ``L_i(q) in [0, 1]``,
    non-increasing in ``q``. Conformal risk control picks the smallest ``q`` with
    ``n/(n+1) * mean_i L_i(q) + 1/(n+1) <= alpha``, i.e. ``sum_i F_i(q) >= (n + 1)(1 - alpha)`` with ``F_i`` the
    fraction of case ``i``'s scores ``<= q``: a quantile of the pooled scores in which each score of case ``i`` weighs
    ``1 / m_i``. Then, for a new exchangeable case, the expected fraction of its scores ``<= q`` is ``>= 1 - alpha``.
    With one score per case this is :func:`conformal_quantile`.

    Args:
        case_scores: one 1-D tensor of finite scores per case (each case's scores a uniform sample of its voxels, or
            all of them).
        alpha: miscoverage level in ``(0, 1)``.

    Returns:
        ``q``; ``+inf`` when ``(n + 1)(1 - alpha) > n`` (``n < 1/alpha - 1`` cases: too few for ``alpha``).

    Raises:
        ValueError: no case, a case without scores, NaN/Inf scores, ``alpha`` outside ``(0, 1)``.

    Example:
        >>> cases = [torch.tensor([0.1, 0.3]), torch.tensor([0.2]), torch.tensor([0.4]), torch.tensor([0.5])]
        >>> q = case_conformal_quantile(cases, 0.4)  # 0.4: 0.1 and 0.3 weigh 1/2, cumulative 0.5, 1.5, 2, 3 >= 5 * 0.6
    """
    alpha = _check_alpha(alpha)
    n = len(case_scores)
    if n == 0:
        raise ValueError("the calibration set is empty (no case): call update() with labelled cases first.")
    flat, weights = [], []
    for i, s in enumerate(case_scores):
        s = as_tensor(torch.as_tensor(s)).detach().flatten().double().cpu()
        if s.numel() == 0:
            raise ValueError(f"case {i} has no calibration scores.")
        flat.append(s)
        weights.append(torch.full_like(s, 1.0 / s.numel()))
    scores, w = torch.cat(flat), torch.cat(weights)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or Inf.")
    target = (n + 1) * (1.0 - alpha)
    target -= 1e-9 * target  # (19 + 1) * 0.9 must reach 18, not miss it through rounding
    if target > n:
        return math.inf
    # by score, ties by weight: the summed sequence depends on the cases, not on their order (ranks gather them in
    # another order than one process sees them), so the result is the same to the last bit
    by_weight = torch.argsort(w, stable=True)
    order = by_weight[torch.argsort(scores[by_weight], stable=True)]
    cum = w[order].cumsum(0)
    j = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype)))
    return float(scores[order[min(j, scores.numel() - 1)]])


def crc_threshold_index(loss_sum: torch.Tensor, n: int, alpha: float, increasing: bool) -> int:
    """Conformal risk control on a grid: the extreme admissible index of a monotone mean loss.

    The loss curve ``L(k)`` (summed over ``n`` cases in ``loss_sum``, each case's loss in ``[0, 1]``) is
    admissible at ``k`` when ``n/(n+1) * mean L(k) + 1/(n+1) <= alpha``, i.e. ``sum L(k) + 1 <= alpha (n + 1)``.

    Args:
        loss_sum: ``K`` summed losses, monotone in ``k``.
        n: number of cases summed.
        alpha: risk level in ``(0, 1)``.
        increasing: ``True`` if the loss grows with ``k`` (return the largest admissible ``k``), ``False`` if it
            shrinks (return the smallest).

    Returns:
        the index; when no index is admissible (too few cases: ``n < 1/alpha - 1``) the safe end (``0`` when
        increasing, ``K - 1`` otherwise), where the loss is 0 by construction.
    """
    ok = loss_sum + 1.0 <= alpha * (n + 1) + 1e-9
    idx = torch.nonzero(ok).flatten()
    K = loss_sum.numel()
    if idx.numel() == 0:
        return 0 if increasing else K - 1
    return int(idx.max()) if increasing else int(idx.min())


def _check_class_names(class_names: object, num_classes: int) -> list[str] | None:
    if class_names is None:
        return None
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise ValueError(f"class_names must be a sequence of {num_classes} strings, got {class_names!r}.")
    names = [str(c) for c in class_names]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names, expected num_classes={num_classes}.")
    return names


def _to_jsonable(value: object) -> object:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    return value


def _from_jsonable(value: object) -> object:
    if value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, list):
        return [_from_jsonable(v) for v in value]
    return value


class _Conformal:
    """Shared input handling and (de)serialisation."""

    kind = ""
    _config_keys: tuple[str, ...] = ()
    _tensor_keys: tuple[str, ...] = ()

    def __init__(self, num_classes: int, class_names: Sequence[str] | None, spatial_dims: int) -> None:
        self.num_classes = check_num_classes(num_classes)
        self.class_names = _check_class_names(class_names, self.num_classes)
        self.spatial_dims = check_integer(spatial_dims, "spatial_dims", minimum=1)
        self.alpha: float | None = None

    # -- inputs -------------------------------------------------------------------------------------------
    def _probs(self, probs: object, name: str = "probs") -> tuple[torch.Tensor, bool]:
        """``probs`` as ``B,C,*spatial`` (checked), and whether it came without a batch axis."""
        if not isinstance(probs, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(probs).__name__}.")
        p = as_tensor(probs).detach()
        sd = self.spatial_dims
        if p.ndim == sd + 1:
            p, single = p.unsqueeze(0), True
        elif p.ndim == sd + 2:
            single = False
        else:
            raise ValueError(
                f"{name} must be B,C,*spatial or C,*spatial with {sd} spatial dims (spatial_dims={sd}), got shape "
                f"{tuple(p.shape)}."
            )
        if p.shape[1] != self.num_classes:
            raise ValueError(
                f"{name} has {p.shape[1]} classes (shape {tuple(p.shape)}) but this {type(self).__name__} has "
                f"num_classes={self.num_classes}."
            )
        if p.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(p.shape)}).")
        check_probabilities(p, dim=1, name=name)
        return p, single

    def _labels(self, labels: object, probs: torch.Tensor, single: bool, ignore_index: int | None) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}.")
        y = as_tensor(labels).detach()
        if single and y.ndim <= probs.ndim - 1:
            y = y.unsqueeze(0)
        return labels_from_target(y.to(probs.device), probs, self.num_classes, ignore_index)

    def _require_fitted(self) -> None:
        if self.alpha is None:
            raise ValueError(f"this {type(self).__name__} is not fitted: call fit(alpha) or load_state_dict() first.")

    # -- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The configuration and fitted state as plain Python values and ``float64`` tensors (no calibration data).

        Raises:
            ValueError: not fitted.
        """
        self._require_fitted()
        state = {
            "kind": self.kind,
            "num_classes": self.num_classes,
            "class_names": None if self.class_names is None else list(self.class_names),
            "spatial_dims": self.spatial_dims,
            "alpha": self.alpha,
        }
        for key in self._config_keys:
            state[key] = getattr(self, key)
        for key in self._tensor_keys:
            state[key] = getattr(self, key).clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (tensors or lists; ``"inf"`` strings as ``+inf``).

        Raises:
            ValueError: another kind of object, a class-count mismatch, or a missing key.
        """
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict, got {type(state).__name__}.")
        missing = [
            k for k in ("kind", "num_classes", "alpha", *self._config_keys, *self._tensor_keys) if k not in state
        ]
        if missing:
            raise ValueError(f"state is missing {missing}.")
        if state["kind"] != self.kind:
            raise ValueError(f"state is a {state['kind']!r} state, not {self.kind!r}.")
        if int(state["num_classes"]) != self.num_classes:
            raise ValueError(f"state has num_classes={state['num_classes']}, this object {self.num_classes}.")
        self.class_names = _check_class_names(state.get("class_names"), self.num_classes)
        self.spatial_dims = check_integer(state.get("spatial_dims", self.spatial_dims), "spatial_dims", minimum=1)
        self.alpha = _check_alpha(state["alpha"])
        for key in self._config_keys:
            setattr(self, key, _from_jsonable(state[key]))
        for key in self._tensor_keys:
            value = state[key]
            t = (
                value.detach().cpu()
                if isinstance(value, torch.Tensor)
                else torch.tensor(_from_jsonable(value), dtype=torch.float64)
            )
            setattr(self, key, t.to(torch.float64))

    def to_json(self) -> str:
        """:meth:`state_dict` as JSON text (``+inf`` written as the string ``"inf"``)."""
        return json.dumps(_to_jsonable(self.state_dict()), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str):
        """A fitted object from :meth:`to_json` text.

        Raises:
            ValueError: not JSON, or a state of another kind.
        """
        try:
            state = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"not a JSON {cls.__name__} state: {e}") from e
        if not isinstance(state, dict) or state.get("kind") != cls.kind:
            kind = state.get("kind") if isinstance(state, dict) else None
            raise ValueError(f"JSON holds a {kind!r} state, not {cls.kind!r}.")
        obj = cls(num_classes=state["num_classes"], spatial_dims=state.get("spatial_dims", 3))
        obj.load_state_dict(state)
        return obj


def _aps_scores(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Randomised APS score of every class: the probability of the classes ranked above it (descending, ties by
    class index) plus ``u`` times its own, ``u`` uniform on ``[0, 1)`` per voxel (``B,1,*spatial``)."""
    sorted_p, order = torch.sort(p, dim=1, descending=True, stable=True)
    above = torch.empty_like(p).scatter_(1, order, sorted_p.cumsum(1) - sorted_p)
    return above + u * p


class ConformalPredictionSets(_Conformal):
    """Voxel-wise split-conformal prediction sets from calibrated probabilities, never empty.

    Score of a voxel with true class ``y``: ``1 - p_y`` (``method="lac"``, the smallest sets on average) or
    ``sum_{j ranked above y} p_j + u p_y`` with ``u ~ U[0, 1)`` per voxel (``method="aps"``, randomised adaptive
    sets; ``u`` from ``seed`` in :meth:`predict`, so a given input always gets the same sets). The set of a new voxel
    is ``{c : score_c <= q}`` plus its argmax class (ties: the lowest index), so no set is empty; adding a class never
    lowers coverage, so the guarantee below holds with or without it.

    **Guarantee (cases exchangeable, not voxels).** ``q`` is :func:`case_conformal_quantile` of the per-case score
    samples: conformal risk control with the per-case loss "fraction of the case's voxels whose true class is not in
    its set". For a new case exchangeable with the ``n`` calibration cases, the expected fraction of its voxels
    covered is ``>= 1 - alpha`` (each case weighted equally, every voxel of a case equally; marginal over calibration
    sets and cases, not per case, per voxel or per class: background voxels dominate it). The finite-sample
    correction counts cases: with ``n < 1/alpha - 1`` cases ``q = +inf`` and every set holds every class. With one
    voxel per case it is the usual voxel-level split-conformal quantile.

    Sampling: :meth:`update` keeps at most ``voxels_per_volume`` scores per case, a uniform sample without replacement
    of its labelled voxels (an unbiased estimate of its loss curve; memory bounded whatever the volume size). Beyond
    ``max_scores`` in all, every case is thinned uniformly in proportion (keeping at least one score per case).

    Args:
        num_classes: number of classes ``C``.
        method: ``"lac"`` or ``"aps"``.
        voxels_per_volume: calibration voxels sampled per case.
        max_scores: cap on all stored scores (at least one per case is kept).
        ignore_index: label value never sampled.
        class_names: optional names, stored with the fitted state.
        spatial_dims: spatial dimensions of the volumes (3: ``B,C,H,W,D``).
        seed: sampling seed (and, for APS, the seed of the uniform draws in :meth:`predict`).

    Example:
        >>> sets = ConformalPredictionSets(num_classes=3)
        >>> probs = torch.softmax(torch.randn(20, 3, 8, 8, 8), 1)
        >>> sets.update(probs, torch.randint(0, 3, (20, 1, 8, 8, 8)))
        >>> q = sets.fit(alpha=0.1)
        >>> mask = sets.predict(probs)  # bool 20,3,8,8,8; mask[:, c] is True where class c is in the set
    """

    kind = "prediction_sets"
    _config_keys = ("method", "threshold", "n", "num_scores", "seed")

    def __init__(
        self,
        num_classes: int,
        method: str = "lac",
        voxels_per_volume: int = 20000,
        max_scores: int = 2_000_000,
        ignore_index: int | None = None,
        class_names: Sequence[str] | None = None,
        spatial_dims: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__(num_classes, class_names, spatial_dims)
        if method not in ("lac", "aps"):
            raise ValueError(f"method must be 'lac' or 'aps', got {method!r}.")
        self.method = method
        self.voxels_per_volume = check_integer(voxels_per_volume, "voxels_per_volume", minimum=1)
        self.max_scores = check_integer(max_scores, "max_scores", minimum=1)
        self.ignore_index = None if ignore_index is None else check_integer(ignore_index, "ignore_index")
        self.seed = check_integer(seed, "seed")
        self.generator = torch.Generator().manual_seed(self.seed)
        self.threshold: float = math.nan
        self.n = 0
        self.num_scores = 0
        self.reset()

    def reset(self) -> None:
        """Forget the calibration scores (the fitted threshold stays)."""
        self._scores: list[torch.Tensor] = []  # one tensor per case

    @property
    def num_volumes(self) -> int:
        """Calibration cases accumulated since the last :meth:`reset`."""
        return len(self._scores)

    def scores(self, probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Conformity scores of every class at every voxel, ``B,C,*spatial`` (lower = more conforming).

        Args:
            probs: probabilities ``B,C,*spatial``.
            generator: CPU generator of the APS uniform draws (default: this object's sampling generator).

        Returns:
            the scores, same shape and (floating) dtype as ``probs``.
        """
        p = probs.float() if not probs.is_floating_point() else probs
        if self.method == "lac":
            return 1.0 - p
        shape = (p.shape[0], 1, *p.shape[2:])
        u = torch.rand(shape, generator=self.generator if generator is None else generator, dtype=p.dtype)
        return _aps_scores(p, u.to(p.device))

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add calibration cases (each batch item is one case; a case without a labelled voxel is skipped).

        Args:
            probs: calibrated probabilities ``B,C,*spatial`` or ``C,*spatial``.
            labels: labels ``B,1,*spatial`` (or ``1,*spatial``, or a one-hot).

        Raises:
            ValueError: shapes, class count, non-probabilities or bad label values.
        """
        p, single = self._probs(probs)
        y = self._labels(labels, p, single, self.ignore_index)
        for b in range(p.shape[0]):
            yb = y[b].reshape(-1)
            keep = yb != self.ignore_index if self.ignore_index is not None else torch.ones_like(yb, dtype=torch.bool)
            idx = torch.nonzero(keep.cpu()).flatten()
            if idx.numel() > self.voxels_per_volume:
                idx = idx[torch.randperm(idx.numel(), generator=self.generator)[: self.voxels_per_volume]]
            if idx.numel() == 0:
                continue
            idx = idx.to(p.device)
            pb = p[b].reshape(self.num_classes, -1)[:, idx]  # C, k
            s = self.scores(pb[None])[0]
            true = yb[idx].long()
            self._scores.append(s.gather(0, true[None])[0].double().cpu())
        self._thin(self.generator)

    def _thin(self, generator: torch.Generator) -> None:
        """Beyond ``max_scores`` in all, thin every case in proportion: each keeps a uniform sample of its voxels
        (at least one)."""
        total = sum(s.numel() for s in self._scores)
        if total > self.max_scores:
            ratio = self.max_scores / total
            thinned = []
            for s in self._scores:
                k = max(1, int(s.numel() * ratio))
                thinned.append(s[torch.randperm(s.numel(), generator=generator)[:k]] if k < s.numel() else s)
            self._scores = thinned

    def calibration_scores(self) -> torch.Tensor:
        """The stored calibration scores of all cases, concatenated (1-D ``float64``)."""
        return torch.cat(self._scores) if self._scores else torch.zeros(0, dtype=torch.float64)

    def all_gather(self) -> None:
        """Replace this process's calibration cases by those of every process (``torch.distributed``), in rank
        order, so that :meth:`fit` on any rank fits on all of them; a no-op on one process. Every process must call
        it (a collective), also one that saw no case.

        The per-case scores are gathered unchanged, so without sampling (cases with at most ``voxels_per_volume``
        labelled voxels, ``max_scores`` not reached) the fit equals that of one process seeing all the cases (the
        fit does not depend on their order). With sampling, each rank drew its cases' samples with its own
        generator: another uniform sample than one process would draw, with the same guarantee. Beyond
        ``max_scores`` in all, the cases are thinned as in :meth:`update` with a generator seeded by ``seed``, the
        same on every rank.
        """
        if world_size() < 2:
            return
        lengths = torch.tensor([s.numel() for s in self._scores], dtype=torch.int64)
        counts = torch.cat(all_gather_rows(lengths))
        scores = torch.cat(all_gather_rows(self.calibration_scores()))
        self._scores = list(torch.split(scores, counts.tolist()))
        self._thin(torch.Generator().manual_seed(self.seed))  # the same generator on every rank

    def fit(self, alpha: float) -> float:
        """Fit the threshold for miscoverage ``alpha`` (:func:`case_conformal_quantile` of the per-case scores).

        Args:
            alpha: in ``(0, 1)``; the expected fraction of a new case's voxels covered is ``>= 1 - alpha``.

        Returns:
            the score threshold ``q`` (``+inf`` with ``n < 1/alpha - 1`` cases: every set is all classes).

        Raises:
            ValueError: ``alpha`` outside ``(0, 1)``; no calibration case.
        """
        alpha = _check_alpha(alpha)
        if not self._scores:
            raise ValueError("the calibration set is empty: call update(probs, labels) with labelled volumes first.")
        self.threshold = case_conformal_quantile(self._scores, alpha)
        self.alpha, self.n, self.num_scores = alpha, len(self._scores), int(self.calibration_scores().numel())
        return self.threshold

    def predict(self, probs: torch.Tensor) -> torch.Tensor:
        """Prediction sets as a boolean mask ``B,C,*spatial`` (``C,*spatial`` for an unbatched input); every voxel's
        set holds at least its argmax class.

        Raises:
            ValueError: not fitted, class-count mismatch, non-probabilities.
        """
        self._require_fitted()
        p, single = self._probs(probs)
        if math.isinf(self.threshold):
            out = torch.ones_like(p, dtype=torch.bool)
        else:  # the score as in calibration, so a voxel scoring exactly q is in its set
            out = self.scores(p, torch.Generator().manual_seed(self.seed)) <= self.threshold
            out.scatter_(1, p.argmax(1, keepdim=True), True)  # never empty
        return out[0] if single else out


class ConformalRiskControl(_Conformal):
    """Per-structure inner and outer masks with conformal risk control of false negatives and false positives.

    Thresholds live on the grid ``t_k = k / bins``; a voxel's grid value is ``floor(clip(p_c, 0, 1) * bins)``, so
    the mask ``{p_c >= t_k}`` is ``{floor(p_c * bins) >= k}`` in fitting and prediction alike.

    * outer mask ``O_c = {p_c >= t_out}``, loss per case ``FNR_c = |Y_c \\ O_c| / |Y_c|`` (true ``c`` voxels left out),
      non-decreasing in ``t``; ``t_out`` is the *largest* grid value with
      ``n/(n+1) * mean_i FNR_i + 1/(n+1) <= alpha``;
    * inner mask ``I_c = {p_c >= t_in}``, loss per case ``FPV_c = min(1, |I_c \\ Y_c| / |Y_c|)`` (voxels of the inner
      mask that are not ``c``, relative to the true volume, clipped at 1), non-increasing in ``t``; ``t_in`` is the
      *smallest* grid value (``k = bins + 1``: the empty mask) satisfying the same bound.

    Then ``E[FNR_c] <= alpha`` and ``E[FPV_c] <= alpha`` for a new case exchangeable with the calibration cases and
    containing class ``c`` (cases without a true ``c`` voxel are skipped in fitting, and not covered). State while
    fitting: per class, the summed loss curves over the cases and the case count (``2 x C x (bins + 2)`` numbers),
    whatever the volume size. ``t_in >= t_out`` is usual but not enforced.

    Args:
        num_classes: number of classes ``C`` (the background too; its masks are fitted like any class).
        bins: grid resolution (1000: thresholds in steps of 0.001).
        ignore_index: label value left out of every count.
        class_names: optional names, stored with the fitted state.
        spatial_dims: spatial dimensions of the volumes.

    Example:
        >>> crc = ConformalRiskControl(num_classes=2)
        >>> probs = torch.softmax(torch.randn(20, 2, 8, 8, 8), 1)
        >>> crc.update(probs, torch.randint(0, 2, (20, 1, 8, 8, 8)))
        >>> t_in, t_out = crc.fit(alpha=0.1)
        >>> inner, outer = crc.predict(probs)  # bool 20,2,8,8,8 each
    """

    kind = "risk_control"
    _config_keys = ("bins", "n")
    _tensor_keys = ("outer_threshold", "inner_threshold")

    def __init__(
        self,
        num_classes: int,
        bins: int = 1000,
        ignore_index: int | None = None,
        class_names: Sequence[str] | None = None,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__(num_classes, class_names, spatial_dims)
        self.bins = check_integer(bins, "bins", minimum=1)
        self.ignore_index = None if ignore_index is None else check_integer(ignore_index, "ignore_index")
        self.outer_threshold = torch.full((self.num_classes,), math.nan, dtype=torch.float64)
        self.inner_threshold = torch.full((self.num_classes,), math.nan, dtype=torch.float64)
        self.n: list[int] = [0] * self.num_classes
        self.reset()

    def reset(self) -> None:
        """Forget the accumulated loss curves (the fitted thresholds stay)."""
        K = self.bins + 2
        self._fnr_sum = torch.zeros(self.num_classes, K, dtype=torch.float64)
        self._fpv_sum = torch.zeros(self.num_classes, K, dtype=torch.float64)
        self._cases = torch.zeros(self.num_classes, dtype=torch.int64)

    def _scaled(self, p: torch.Tensor) -> torch.Tensor:
        """``clip(p, 0, 1) * bins`` in float32; its floor is the grid value, and ``floor(x) >= k`` iff ``x >= k``."""
        return p.float().clamp(0.0, 1.0) * self.bins

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add calibration cases (each batch item is one case).

        Args:
            probs: calibrated probabilities ``B,C,*spatial`` or ``C,*spatial``.
            labels: labels ``B,1,*spatial`` (or ``1,*spatial``, or a one-hot).

        Raises:
            ValueError: shapes, class count, non-probabilities or bad label values.
        """
        p, single = self._probs(probs)
        y = self._labels(labels, p, single, self.ignore_index)
        C, nb = self.num_classes, self.bins + 1  # grid values 0..bins
        for b in range(p.shape[0]):
            yb = y[b].reshape(-1)
            pb = p[b].reshape(C, -1)
            if self.ignore_index is not None:
                valid = yb != self.ignore_index
                yb, pb = yb[valid], pb[:, valid]
            # per class, histograms of the grid value over all (valid) voxels and over the true ones: memory O(N)
            all_hist, true_hist = torch.zeros(C, nb, dtype=torch.float64), torch.zeros(C, nb, dtype=torch.float64)
            for c in range(C):
                g = self._scaled(pb[c]).long()
                all_hist[c] = torch.bincount(g, minlength=nb).double().cpu()
                true_hist[c] = torch.bincount(g[yb == c], minlength=nb).double().cpu()
            false_hist = all_hist - true_hist
            size = true_hist.sum(1)  # |Y_c|
            present = size > 0
            if not bool(present.any()):
                continue
            zero = torch.zeros(C, 1, dtype=torch.float64)
            # FNR at k = 0..bins+1: true voxels with grid value < k.
            fn = torch.cat([zero, true_hist.cumsum(1)], 1)
            # false positives at k: non-c voxels with grid value >= k (k = bins+1: none).
            fp = torch.cat([false_hist.flip(1).cumsum(1).flip(1), zero], 1)
            denom = size.clamp_min(1.0)[:, None]
            self._fnr_sum[present] += (fn / denom)[present]
            self._fpv_sum[present] += (fp / denom).clamp(max=1.0)[present]
            self._cases += present.long()

    def all_gather(self) -> None:
        """Sum the loss curves and case counts of every process (``torch.distributed``) into each, so that
        :meth:`fit` on any rank fits on all the cases; a no-op on one process. Every process must call it (a
        collective), also one that saw no case.

        The sums of all the cases are those one process would accumulate, up to floating-point rounding (about
        1e-16 relative), far inside the ``1e-9`` of the admissibility test: the thresholds are the same.
        """
        self._fnr_sum = all_reduce_sum(self._fnr_sum)
        self._fpv_sum = all_reduce_sum(self._fpv_sum)
        self._cases = all_reduce_sum(self._cases)

    def fit(self, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose ``t_in`` and ``t_out`` per class for risk level ``alpha``.

        A class with too few cases (``n < 1/alpha - 1``) gets the safe masks: outer everything (``t_out = 0``),
        inner empty (``t_in = +inf``).

        Returns:
            ``(inner_threshold, outer_threshold)``, ``float64`` tensors of ``C`` values.

        Raises:
            ValueError: ``alpha`` outside ``(0, 1)``; no case with any labelled structure.
        """
        alpha = _check_alpha(alpha)
        if int(self._cases.sum()) == 0:
            raise ValueError("the calibration set is empty: call update(probs, labels) with labelled cases first.")
        outer, inner = [], []
        for c in range(self.num_classes):
            n = int(self._cases[c])
            k_out = crc_threshold_index(self._fnr_sum[c], n, alpha, increasing=True) if n else 0
            k_in = crc_threshold_index(self._fpv_sum[c], n, alpha, increasing=False) if n else self.bins + 1
            outer.append(k_out / self.bins)
            inner.append(math.inf if k_in > self.bins else k_in / self.bins)
        self.outer_threshold = torch.tensor(outer, dtype=torch.float64)
        self.inner_threshold = torch.tensor(inner, dtype=torch.float64)
        self.alpha, self.n = alpha, self._cases.tolist()
        return self.inner_threshold.clone(), self.outer_threshold.clone()

    def _index(self, t: torch.Tensor) -> torch.Tensor:
        k = torch.where(torch.isinf(t), torch.full_like(t, self.bins + 1), (t * self.bins).round())
        return k.long()

    def predict(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inner and outer masks, each boolean ``B,C,*spatial`` (``C,*spatial`` for an unbatched input).

        Raises:
            ValueError: not fitted, class-count mismatch, non-probabilities.
        """
        self._require_fitted()
        p, single = self._probs(probs)
        x = self._scaled(p)
        shape = (1, self.num_classes) + (1,) * (p.ndim - 2)
        inner = x >= self._index(self.inner_threshold).to(x).view(shape)
        outer = x >= self._index(self.outer_threshold).to(x).view(shape)
        return (inner[0], outer[0]) if single else (inner, outer)


class ConformalVolumeIntervals(_Conformal):
    """Per-case structure-volume intervals (mL) with coverage ``1 - alpha``.

    Per case and class ``c`` with voxel volume ``v`` (mL): expected volume ``V_hat = v * sum p_c``, scale
    ``s = v * (sqrt(sum p_c (1 - p_c)) + 1)`` (the standard deviation of the volume if voxels were independent
    Bernoulli(p_c), plus one voxel so that a confident case has a non-zero scale; ``scale="none"``: ``s = 1`` mL),
    true volume ``V = v * |Y_c|``, score ``|V - V_hat| / s``. With ``q_c`` the ``ceil((n+1)(1-alpha))``-th smallest
    score of class ``c`` over the ``n`` calibration cases, the interval of a new case is
    ``[max(0, V_hat - q_c s), V_hat + q_c s]``; it holds the true volume with probability ``>= 1 - alpha`` for a case
    exchangeable with the calibration cases (marginally, per class). Cases without the structure count (true
    volume 0). Ignored voxels (``ignore_index``) count in neither volume during calibration, while
    :meth:`predict` counts every voxel: use it only for voxels that cannot hold the structures (e.g. padding). State while fitting: ``C`` scores per case.

    Args:
        num_classes: number of classes ``C``.
        scale: ``"std"`` (above) or ``"none"`` (absolute residuals in mL).
        ignore_index: label value left out of both volumes.
        class_names: optional names, stored with the fitted state.
        spatial_dims: spatial dimensions of the volumes.

    Example:
        >>> vol = ConformalVolumeIntervals(num_classes=2)
        >>> probs = torch.softmax(torch.randn(20, 2, 8, 8, 8), 1)
        >>> vol.update(probs, torch.randint(0, 2, (20, 1, 8, 8, 8)), spacing=(1.0, 1.0, 1.5))
        >>> q = vol.fit(alpha=0.1)
        >>> low, high = vol.predict(probs, spacing=(1.0, 1.0, 1.5))  # mL, 20,2 each
    """

    kind = "volume_intervals"
    _config_keys = ("scale", "n")
    _tensor_keys = ("quantile",)

    def __init__(
        self,
        num_classes: int,
        scale: str = "std",
        ignore_index: int | None = None,
        class_names: Sequence[str] | None = None,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__(num_classes, class_names, spatial_dims)
        if scale not in ("std", "none"):
            raise ValueError(f"scale must be 'std' or 'none', got {scale!r}.")
        self.scale = scale
        self.ignore_index = None if ignore_index is None else check_integer(ignore_index, "ignore_index")
        self.quantile = torch.full((self.num_classes,), math.nan, dtype=torch.float64)
        self.n = 0
        self.reset()

    def reset(self) -> None:
        """Forget the calibration scores (the fitted quantiles stay)."""
        self._scores: list[torch.Tensor] = []

    def _voxel_ml(self, spacing: object, batch: int) -> torch.Tensor:
        """Voxel volume in mL per case from ``spacing`` in mm (``None``: 1 mm; ``D`` values; or ``B x D``)."""
        if spacing is None:
            return torch.full((batch,), 1e-3, dtype=torch.float64)
        try:
            s = torch.as_tensor(spacing, dtype=torch.float64).cpu()
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"spacing must be {self.spatial_dims} numbers in mm (or B x D), got {spacing!r}.") from e
        if s.ndim == 1:
            s = s[None].expand(batch, -1)
        if s.shape != (batch, self.spatial_dims) or not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            raise ValueError(
                f"spacing must be {self.spatial_dims} positive finite numbers in mm, or {batch} x {self.spatial_dims}, "
                f"got {spacing!r}."
            )
        return s.prod(1) / 1000.0

    def _estimate(self, p: torch.Tensor, valid: torch.Tensor | None, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Expected volume and scale (mL), each ``B,C``."""
        q = p.double().flatten(2)
        if valid is not None:
            q = q * valid.flatten(2)
        v = v.to(q.device)[:, None]
        expected = q.sum(2) * v
        if self.scale == "std":
            scale = (torch.sqrt((q * (1.0 - q)).clamp_min(0).sum(2)) + 1.0) * v
        else:
            scale = torch.ones_like(expected)
        return expected.cpu(), scale.cpu()

    def update(self, probs: torch.Tensor, labels: torch.Tensor, spacing: object = None) -> None:
        """Add calibration cases (each batch item is one case).

        Args:
            probs: calibrated probabilities ``B,C,*spatial`` or ``C,*spatial``.
            labels: labels ``B,1,*spatial`` (or ``1,*spatial``, or a one-hot).
            spacing: voxel spacing in mm: ``None`` (1 mm), ``D`` numbers, or one row of ``D`` per case.

        Raises:
            ValueError: shapes, class count, non-probabilities, bad label values or spacing.
        """
        p, single = self._probs(probs)
        y = self._labels(labels, p, single, self.ignore_index)
        v = self._voxel_ml(spacing, p.shape[0])
        valid = None if self.ignore_index is None else (y != self.ignore_index)
        expected, scale = self._estimate(p, valid, v)
        classes = torch.arange(self.num_classes, device=p.device).view(1, -1, *([1] * self.spatial_dims))
        onehot = y == classes
        if valid is not None:
            onehot &= valid
        true = onehot.flatten(2).sum(2).double().cpu() * v[:, None]
        self._scores.append((true - expected).abs() / scale)

    def all_gather(self) -> None:
        """Replace this process's calibration scores by those of every process (``torch.distributed``), in rank
        order, so that :meth:`fit` on any rank fits on all the cases (the quantile does not depend on their order);
        a no-op on one process. Every process must call it (a collective), also one that saw no case.
        """
        if world_size() < 2:
            return
        mine = torch.cat(self._scores) if self._scores else torch.zeros(0, self.num_classes, dtype=torch.float64)
        self._scores = [s for s in all_gather_rows(mine.to(torch.float64)) if s.shape[0]]

    def fit(self, alpha: float) -> torch.Tensor:
        """Fit the per-class quantile of the normalised residuals.

        Returns:
            ``q``, ``float64`` of ``C`` values (``+inf`` for every class when ``ceil((n+1)(1-alpha)) > n``).

        Raises:
            ValueError: ``alpha`` outside ``(0, 1)``; no calibration case.
        """
        alpha = _check_alpha(alpha)
        if not self._scores:
            raise ValueError("the calibration set is empty: call update(probs, labels) with labelled cases first.")
        s = torch.cat(self._scores)  # n, C
        self.quantile = torch.tensor([conformal_quantile(s[:, c], alpha) for c in range(self.num_classes)])
        self.quantile = self.quantile.to(torch.float64)
        self.alpha, self.n = alpha, int(s.shape[0])
        return self.quantile.clone()

    def estimate(self, probs: torch.Tensor, spacing: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Expected volume ``V_hat`` and scale ``s`` (both mL) of every class, the centre and unit of the interval.

        Args:
            probs: calibrated probabilities ``B,C,*spatial`` or ``C,*spatial``.
            spacing: voxel spacing in mm, as in :meth:`update`.

        Returns:
            ``(expected, scale)``, ``float64`` ``B,C`` (``C`` for an unbatched input). Needs no fitting.

        Raises:
            ValueError: class-count mismatch, non-probabilities, bad spacing.
        """
        p, single = self._probs(probs)
        expected, scale = self._estimate(p, None, self._voxel_ml(spacing, p.shape[0]))
        return (expected[0], scale[0]) if single else (expected, scale)

    def predict(self, probs: torch.Tensor, spacing: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Volume intervals in mL.

        Args:
            probs: calibrated probabilities ``B,C,*spatial`` or ``C,*spatial``.
            spacing: voxel spacing in mm, as in :meth:`update`.

        Returns:
            ``(low, high)``, ``float64`` ``B,C`` (``C`` for an unbatched input); ``high`` is ``+inf`` where the
            quantile is.

        Raises:
            ValueError: not fitted, class-count mismatch, non-probabilities, bad spacing.
        """
        self._require_fitted()
        p, single = self._probs(probs)
        expected, scale = self._estimate(p, None, self._voxel_ml(spacing, p.shape[0]))
        half = self.quantile[None] * scale  # scale > 0, so an infinite quantile gives +inf
        low, high = (expected - half).clamp_min(0.0), expected + half
        return (low[0], high[0]) if single else (low, high)
