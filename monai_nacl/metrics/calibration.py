"""Streaming calibration metrics for 3D segmentation.

Only per-bin sufficient statistics are kept, so memory does not depend on the number of voxels or volumes.
Definitions (``B`` bins; ``n_k`` voxels, mean confidence ``conf_k``, mean accuracy ``acc_k``, ``N = sum_k n_k``;
empty bins are skipped):

* ``ece``  (top-label)  ``sum_k n_k / N * |acc_k - conf_k|`` with confidence ``max_c p_c`` and accuracy
  ``[argmax_c p_c = y]``.
* ``ace``  (top-label)  ``mean_{k: n_k > 0} |acc_k - conf_k|`` (average calibration error over non-empty bins).
* ``mce``  (top-label)  ``max_{k: n_k > 0} |acc_k - conf_k|``.
* ``cece`` (class-wise) ``1/C sum_c ECE_c`` where ``ECE_c`` bins ``p_c`` against ``[y = c]`` (one-vs-rest, as
  ``monai.metrics.CalibrationErrorMetric``), over all classes including background.
* ``nll``  ``mean_i -log max(p_{i, y_i}, 1e-12)``.
* ``brier`` ``mean_i sum_c (p_ic - [y_i = c])^2``.

Bins (``binning``): ``"uniform"``: equal width on ``[0, 1]``, bin ``k`` holds confidences in ``[k/B, (k+1)/B)``,
the last bin also holds 1.0. ``"adaptive"``: equal mass, the confidences sorted ascending and split into ``B``
runs of consecutive ranks whose sizes differ by at most one (the first ``N mod B`` runs one longer, as
``numpy.array_split``); see :func:`equal_mass_bins` for how they are formed from streamed statistics.

Which voxels count is ``mask``: ``"all"`` or ``"foreground"`` (ground truth not background: the NACL/SVLS
paper protocol), minus ``ignore_index`` voxels. ``aggregate("macro")`` computes each metric per volume and
averages over volumes (the paper protocol); ``"micro"`` pools all voxels of all volumes first.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
from monai.utils import get_dist_device, look_up_option

from monai_nacl.input_checks import (
    as_tensor,
    check_ignore_index,
    check_integer,
    check_num_classes,
    check_probabilities,
    labels_from_target,
    probability_error,
    probability_tolerance,
)

__all__ = ["CalibrationMetric", "BinStatistics", "calibration_errors", "equal_mass_bins", "fine_bin_index"]

KEYS = ("ece", "ace", "mce", "cece", "nll", "brier")
BOUND_KEYS = ("ece_bound", "ace_bound", "mce_bound", "cece_bound")
BINNINGS = ("uniform", "adaptive")

# Fine histogram of the adaptive binning: a probability x is keyed by the float32 bits of q = min(x, 1 - x)
# (1 - x is exact in float32 for x >= 1/2) keeping FINE_BITS mantissa bits, mirrored for x > 1/2. The keys
# are monotone in x and the bins are log-spaced towards 0 and 1, where segmentation confidences pile up:
# relative width 2^-FINE_BITS in q, absolute width at most 2^-(FINE_BITS + 1).
FINE_BITS = 7
_SHIFT = 23 - FINE_BITS
_HALF = (0x3F000000 >> _SHIFT) + 1  # keys of q in [0, 1/2] (0x3F000000: the float32 bits of 0.5)
NUM_FINE_BINS = 2 * _HALF
FINE_WIDTH = 2.0**-FINE_BITS  # a bound on the width of a fine bin (twice the float32 value, for rounding)


def fine_bin_index(x: torch.Tensor) -> torch.Tensor:
    """Fine-histogram bin of each probability for adaptive binning: int64 in ``[0, NUM_FINE_BINS)``.

    Monotone non-decreasing in ``x`` (larger probabilities never get a smaller index); a bin spans at most
    ``FINE_WIDTH`` in probability. Values below 0 or above 1 (within the probability tolerance) go to the
    first or last bin.

    Args:
        x: probabilities, float32 or float64 (float64 is rounded to float32 for the key).

    Returns:
        int64 tensor of the shape of ``x``.
    """
    q = torch.minimum(x, 1 - x).clamp_min_(0)
    if q.dtype != torch.float32:
        q = q.float()
    k = torch.bitwise_right_shift(q.view(torch.int32), _SHIFT).long()
    return torch.where(x > 0.5, (NUM_FINE_BINS - 1) - k, k)


class BinStatistics:
    """Sufficient statistics of one or more volumes (leading dimension ``V``), float64.

    Attributes:
        top: ``V,3,B`` top-label ``(count, sum confidence, sum accuracy)`` per bin.
        ovr: ``V,3,C,B`` one-vs-rest ``(count, sum p_c, sum [y = c])`` per class and bin.
        scalars: ``V,3`` ``(voxel count, sum NLL, sum Brier)``.
        equal_mass_bins: ``None`` when the last axis holds the bins themselves; otherwise the last axis is the
            fine histogram of adaptive binning (:func:`fine_bin_index`) and this many equal-mass bins are formed
            from it (:meth:`equal_mass`).
        binning: ``"uniform"`` (equal-width bins) or ``"adaptive"`` (equal-mass bins, or the fine histogram they
            are formed from); reliability diagrams draw the two differently. Set from ``equal_mass_bins`` when
            that is given.
    """

    def __init__(
        self,
        top: torch.Tensor,
        ovr: torch.Tensor,
        scalars: torch.Tensor,
        equal_mass_bins: int | None = None,
        binning: str = "uniform",
    ) -> None:
        self.top, self.ovr, self.scalars = top, ovr, scalars
        self.equal_mass_bins = equal_mass_bins
        self.binning = look_up_option("adaptive" if equal_mass_bins is not None else binning, BINNINGS)

    def pooled(self) -> BinStatistics:
        return BinStatistics(
            self.top.sum(0, keepdim=True),
            self.ovr.sum(0, keepdim=True),
            self.scalars.sum(0, keepdim=True),
            self.equal_mass_bins,
            self.binning,
        )

    def equal_mass(self) -> BinStatistics:
        """The ``B`` equal-mass bins of a fine histogram (``self`` when the bins are already formed). Sums of
        fine bins split by a bin edge are shared in proportion (:func:`equal_mass_bins`)."""
        if self.equal_mass_bins is None:
            return self
        top = torch.stack(equal_mass_bins(*self.top.unbind(1), self.equal_mass_bins)[:3], 1)
        ovr = torch.stack(equal_mass_bins(*self.ovr.unbind(1), self.equal_mass_bins)[:3], 1)
        return BinStatistics(top, ovr, self.scalars, binning="adaptive")

    def to_dict(self) -> dict:
        """Pooled statistics as plain lists (JSON-serialisable), e.g. for reliability diagrams; for adaptive
        binning, the equal-mass bins."""
        p = self.pooled().equal_mass()
        return {
            "top_label": {
                "count": p.top[0, 0].tolist(),
                "sum_confidence": p.top[0, 1].tolist(),
                "sum_accuracy": p.top[0, 2].tolist(),
            },
            "per_class": {
                "count": p.ovr[0, 0].tolist(),
                "sum_confidence": p.ovr[0, 1].tolist(),
                "sum_accuracy": p.ovr[0, 2].tolist(),
            },
            "voxels": p.scalars[0, 0].item(),
            "binning": self.binning,
        }


def equal_mass_bins(
    count: torch.Tensor, sum_conf: torch.Tensor, sum_acc: torch.Tensor, num_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Form ``num_bins`` equal-mass bins from a fine histogram whose bins are ordered by confidence.

    Bin ``k`` holds the ranks ``[r_k, r_{k+1})`` of the ascending order, ``r_k = k * (N // B) + min(k, N % B)``
    (sizes as ``numpy.array_split``). A fine bin that a rank edge cuts is shared in proportion to the ranks on
    each side, i.e. its voxels are treated as exchangeable; everything else is exact. The result equals
    sorting the voxels themselves whenever no edge falls strictly inside a fine bin (the returned ``split`` is
    then 0). Otherwise, for a fine bin with ``n`` voxels of which ``a`` fall in bin ``k``, the proportional
    share of ``sum(acc - conf)`` differs from that of any ``a`` of its voxels by at most
    ``a (n - a) / n * (1 + FINE_WIDTH)`` (``acc - conf`` varies by at most ``1 + FINE_WIDTH`` within a fine bin),
    whatever the order of tied confidences; ``split[k]`` sums ``a (n - a) / n`` over the fine bins cut at bin
    ``k``'s edges.

    Args:
        count: ``*, F`` voxels per fine bin (whole numbers).
        sum_conf: ``*, F`` summed confidence per fine bin.
        sum_acc: ``*, F`` summed accuracy per fine bin.
        num_bins: number of equal-mass bins ``B``.

    Returns:
        ``(count, sum_conf, sum_acc, split)``, each ``*, B``, float64.

    Example:
        >>> n = torch.tensor([2.0, 0.0, 2.0])
        >>> equal_mass_bins(n, torch.tensor([0.2, 0.0, 1.6]), torch.tensor([0.0, 0.0, 2.0]), 2)[1]
        tensor([0.2000, 1.6000], dtype=torch.float64)
    """
    count, sum_conf, sum_acc = (t.to(torch.float64) for t in (count, sum_conf, sum_acc))
    total = count.sum(-1, keepdim=True)
    k = torch.arange(num_bins + 1, dtype=torch.float64, device=count.device)
    base = torch.div(total, num_bins, rounding_mode="floor")
    ranks = k * base + torch.minimum(k, total - base * num_bins)  # *, B + 1
    cum = count.cumsum(-1)
    idx = torch.searchsorted(cum.contiguous(), ranks.contiguous(), side="left").clamp_(max=count.shape[-1] - 1)
    n_f = count.gather(-1, idx)
    start = (cum - count).gather(-1, idx)
    frac = (ranks - start) / n_f.clamp_min(1)

    def at_ranks(s: torch.Tensor) -> torch.Tensor:
        # cumulative sum up to each rank edge, linear inside the fine bin the edge falls in
        return (s.cumsum(-1) - s).gather(-1, idx) + frac * s.gather(-1, idx)

    conf_c, acc_c = at_ranks(sum_conf).diff(dim=-1), at_ranks(sum_acc).diff(dim=-1)
    count_c = ranks.diff(dim=-1)
    inside = (start < ranks) & (ranks < start + n_f)  # the edge cuts fine bin idx
    n_safe = n_f.clamp_min(1)
    a_left = (start + n_f - ranks)[..., :-1]  # part of the fine bin at the left edge that is in bin k
    a_right = (ranks - start)[..., 1:]
    e_left = torch.where(inside[..., :-1], a_left * (n_f[..., :-1] - a_left) / n_safe[..., :-1], 0.0)
    e_right = torch.where(inside[..., 1:], a_right * (n_f[..., 1:] - a_right) / n_safe[..., 1:], 0.0)
    within = inside[..., :-1] & inside[..., 1:] & (idx[..., :-1] == idx[..., 1:])  # bin k inside one fine bin
    e_within = count_c * (n_f[..., 1:] - count_c) / n_safe[..., 1:]
    split = torch.where(within, e_within, e_left + e_right)
    return count_c, conf_c, acc_c, split


def _binned_errors(count: torch.Tensor, conf: torch.Tensor, acc: torch.Tensor):
    """ECE, ACE and MCE over the last (bin) axis; NaN where there is no voxel at all."""
    nonempty = count > 0
    gap = torch.where(nonempty, (acc - conf).abs() / count.clamp_min(1), torch.zeros_like(conf))
    n = count.sum(-1)
    ece = (gap * count).sum(-1) / n
    ace = gap.sum(-1) / nonempty.sum(-1)
    mce = torch.where(nonempty, gap, torch.full_like(gap, -1.0)).amax(-1)
    mce = torch.where(n > 0, mce, torch.full_like(mce, float("nan")))
    return ece, ace, mce


def _split_bounds(count: torch.Tensor, split: torch.Tensor):
    """Largest change of ECE, ACE and MCE that proportional sharing of cut fine bins can make."""
    err = split * (1 + FINE_WIDTH)  # per bin, on |sum acc - sum conf|
    return _binned_errors(count, torch.zeros_like(err), err)


def calibration_errors(stats: BinStatistics) -> dict[str, torch.Tensor]:
    """Every metric of the module docstring, per volume (shape ``V``); NaN for a volume without voxels.

    For statistics of adaptive binning (``stats.equal_mass_bins`` set), also ``ece_bound``, ``ace_bound``,
    ``mce_bound`` and ``cece_bound``: the most by which each value can differ from equal-mass binning of the
    sorted voxels themselves, for any order of tied confidences (0 when no bin edge cuts a fine bin; see
    :func:`equal_mass_bins`).

    Args:
        stats: per-volume statistics (``update``'s return) or pooled ones.

    Returns:
        dict of float64 tensors of shape ``V``.
    """
    bounds = {}
    if stats.equal_mass_bins is None:
        top, ovr = stats.top.unbind(1), stats.ovr.unbind(1)
    else:
        *top, split_top = equal_mass_bins(*stats.top.unbind(1), stats.equal_mass_bins)
        *ovr, split_ovr = equal_mass_bins(*stats.ovr.unbind(1), stats.equal_mass_bins)
        b_ece, b_ace, b_mce = _split_bounds(top[0], split_top)
        b_cece = _split_bounds(ovr[0], split_ovr)[0].mean(-1)
        bounds = {"ece_bound": b_ece, "ace_bound": b_ace, "mce_bound": b_mce, "cece_bound": b_cece}
    ece, ace, mce = _binned_errors(*top)
    ece_c, _, _ = _binned_errors(*ovr)
    n = stats.scalars[:, 0]
    return {
        "ece": ece,
        "ace": ace,
        "mce": mce,
        "cece": ece_c.mean(-1),
        "nll": stats.scalars[:, 1] / n,
        "brier": stats.scalars[:, 2] / n,
        **bounds,
    }


class CalibrationMetric:
    """Streaming calibration metrics (ECE, ACE, MCE, class-wise ECE, NLL, Brier) per volume and pooled.

    Call it per batch, then :meth:`aggregate`; :meth:`reset` clears the state. Across processes the
    statistics are summed with ``torch.distributed.all_reduce`` when a process group is initialised (unless
    ``sync=False``).

    Adaptive (equal-mass) bins cannot be fixed before every voxel is seen, and keeping the voxels would make the
    state grow with them. With ``binning="adaptive"`` the state is instead a fine histogram of ``NUM_FINE_BINS``
    (32258) bins ordered by confidence (:func:`fine_bin_index`: log-spaced towards 0 and 1, at most ``2^-7``
    wide), with the same ``(count, sum confidence, sum accuracy)`` per bin, top-label and per class. Such
    histograms add up over batches, volumes and processes exactly like the uniform ones; the ``num_bins``
    equal-mass bins are formed from them only when the metric is computed (per volume for ``"macro"``, from
    the pooled histogram for ``"micro"``), see :func:`equal_mass_bins`. The result is exact unless a bin edge
    cuts a fine bin (voxels with nearly or exactly equal confidences); the worst-case deviation from sorting
    the voxels themselves is reported as ``ece_bound``, ``ace_bound``, ``mce_bound`` and ``cece_bound``. The
    state is ``3 * (C + 1) * 32258`` float64 values (3 MB for 4 classes), still flat in voxels and volumes.

    Args:
        num_classes: number of classes ``C``.
        num_bins: confidence bins (15 in the NACL/SVLS papers).
        mask: ``"all"`` voxels or ``"foreground"`` (ground-truth label != 0, the paper protocol).
        ignore_index: label whose voxels never count.
        per_volume: keep each volume's metric values (a few floats per volume) for :meth:`get_per_volume`
            (per-case CSVs). The histograms themselves are never kept per volume.
        sync: all-reduce the statistics across processes in :meth:`aggregate` and :meth:`bin_statistics` when
            ``torch.distributed`` is initialised; ``False`` for statistics that live on one rank only.
        binning: ``"uniform"`` (equal-width bins) or ``"adaptive"`` (equal-mass bins; see above). Applies to
            ``ece``, ``ace``, ``mce`` and ``cece``.

    Raises:
        ValueError: ``num_classes`` or ``num_bins`` not an integer (``num_bins=True`` and ``15.5`` included),
            ``mask`` or ``binning`` unknown, ``ignore_index`` not an integer or ``None``.

    Example:
        >>> metric = CalibrationMetric(num_classes=3, mask="foreground")
        >>> probs = torch.softmax(torch.randn(2, 3, 8, 8, 8), 1)
        >>> metric(probs, torch.randint(0, 3, (2, 1, 8, 8, 8)))
        >>> sorted(metric.aggregate())[:3]
        ['ace', 'brier', 'cece']
        >>> adaptive = CalibrationMetric(num_classes=3, binning="adaptive")
        >>> adaptive(probs, torch.randint(0, 3, (2, 1, 8, 8, 8)))
        >>> result = adaptive.aggregate("micro")  # result["ece"], within result["ece_bound"] of exact
    """

    def __init__(
        self,
        num_classes: int,
        num_bins: int = 15,
        mask: str = "all",
        ignore_index: int | None = None,
        per_volume: bool = False,
        sync: bool = True,
        binning: str = "uniform",
    ) -> None:
        num_classes = check_num_classes(num_classes)
        num_bins = check_integer(num_bins, "num_bins", minimum=1)
        if mask not in ("all", "foreground"):
            raise ValueError(f"mask must be 'all' or 'foreground', got {mask!r}.")
        if not isinstance(binning, str) or binning not in BINNINGS:
            try:  # MONAI's message, with a suggestion for a misspelling
                look_up_option(binning, BINNINGS)
            except ValueError as e:
                raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}. {e}") from None
        self.binning = look_up_option(binning, BINNINGS)
        self.num_classes, self.num_bins, self.mask = int(num_classes), num_bins, mask
        self.ignore_index, self.per_volume = check_ignore_index(ignore_index), per_volume
        self.sync = bool(sync)
        self.keys = KEYS + (BOUND_KEYS if self.binning == "adaptive" else ())
        self._buffers_key: tuple | None = None
        self.reset()

    def reset(self) -> None:
        """Clear all accumulated statistics."""
        c = self.num_classes
        b, em = (self.num_bins, None) if self.binning == "uniform" else (NUM_FINE_BINS, self.num_bins)
        self._pooled = BinStatistics(
            torch.zeros(1, 3, b, dtype=torch.float64),
            torch.zeros(1, 3, c, b, dtype=torch.float64),
            torch.zeros(1, 3, dtype=torch.float64),
            em,
        )
        self._macro_sum = torch.zeros(len(self.keys), dtype=torch.float64)
        self._counts = torch.zeros(2, dtype=torch.float64)  # volumes with voxels, volumes without
        self._volumes: list[dict[str, float]] = []

    def __call__(self, y_pred: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Add a batch. ``y_pred``: probabilities ``B,C,*spatial`` (or a list of ``C,*spatial``); ``y``: labels
        ``B,1,*spatial`` / one-hot ``B,C,*spatial`` (or a list of per-volume tensors)."""
        if isinstance(y_pred, (list, tuple)):
            if not isinstance(y, (list, tuple)) or len(y) != len(y_pred):
                raise ValueError("y_pred and y must both be tensors or lists of the same length.")
            for p, t in zip(y_pred, y):
                self.update(as_tensor(p)[None], as_tensor(t)[None])
            return
        self.update(y_pred, y)

    def update(self, y_pred: torch.Tensor, y: torch.Tensor) -> BinStatistics:
        """Add a batch of volumes and return its per-volume statistics.

        Args:
            y_pred: probabilities ``B,C,*spatial`` (softmax over channels; a tensor that requires grad is detached).
                Any number of spatial dimensions and any memory layout.
            y: labels ``B,1,*spatial`` / ``B,*spatial`` (whole-number values) or a hard one-hot ``B,C,*spatial``.

        Returns:
            the batch's per-volume statistics (a fine histogram for adaptive binning).

        Raises:
            ValueError: wrong channel count or shapes; labels that are not whole numbers (``1.9`` is never floored)
                or are outside ``[0, C)`` other than ``ignore_index``; a one-hot ``y`` that is not a hard one-hot;
                ``y_pred`` that is not probabilities over the channel axis: NaN/Inf, values outside ``[0, 1]``
                (logits), or channel sums not 1 (sigmoid outputs; see
                :func:`monai_nacl.input_checks.probability_error` for the tolerance). The message gives the range.
        """
        p = as_tensor(y_pred)
        if not isinstance(p, torch.Tensor) or p.ndim < 3 or not p.is_floating_point():
            raise ValueError(f"y_pred must be floating probabilities B,C,*spatial, got {getattr(p, 'shape', type(p))}.")
        p = p.detach()
        if p.shape[1] != self.num_classes:
            raise ValueError(f"y_pred has {p.shape[1]} channels (shape {tuple(p.shape)}), expected {self.num_classes}.")
        if p.numel() == 0:
            raise ValueError(f"y_pred is empty (shape {tuple(p.shape)}).")
        labels = labels_from_target(as_tensor(y).to(p.device), p, self.num_classes, self.ignore_index)
        stats = self._statistics(p, labels)
        self._accumulate(stats)
        return stats

    def _statistics(self, p: torch.Tensor, labels: torch.Tensor) -> BinStatistics:
        n_vol, c, nb = p.shape[0], self.num_classes, self.num_bins
        adaptive = self.binning == "adaptive"
        dev = p.device
        valid = None
        if self.ignore_index is not None:
            valid = labels != self.ignore_index
            labels = torch.where(valid, labels, torch.zeros_like(labels))
        labels = labels.long()
        if self.mask == "foreground":
            fg = labels != 0
            valid = fg if valid is None else valid & fg
        atol = probability_tolerance(p.dtype)  # the caller's dtype, before the float32 cast (float16: 5e-3)
        if not p.dtype == torch.float64:
            p = p.float()
        p3 = p.reshape(n_vol, c, -1)
        lab3 = labels.reshape(n_vol, 1, -1)
        valid3 = None if valid is None else valid.reshape(n_vol, 1, -1)
        dump3 = None if valid is None else ~valid3
        n_vox = p3.shape[-1]

        # Histogram slots (volume, [class,] bin). Uniform: nb + 1 bins each, the extra bin holds p == 1.0 until it
        # is folded into the last bin; adaptive: the fine bins. Voxels that do not count are shifted by `size`
        # into a dump half, dropped.
        stride = NUM_FINE_BINS if adaptive else nb + 1
        size_top, size_c = n_vol * stride, n_vol * c * stride
        vol = torch.arange(n_vol, device=dev).view(n_vol, 1, 1)
        off_top = vol * stride
        off_c = (vol * c + torch.arange(c, device=dev).view(1, c, 1)) * stride
        top_n = torch.zeros(2 * size_top, dtype=torch.long, device=dev)
        top_s = torch.zeros(2, 2 * size_top, dtype=torch.float64, device=dev)
        ovr_n = torch.zeros(2, 2 * size_c, dtype=torch.long, device=dev)
        ovr_s = torch.zeros(2 * size_c, dtype=torch.float64, device=dev)
        scalars = torch.zeros(n_vol, 3, dtype=torch.float64, device=dev)

        # CPU: blocks along the voxels with reused buffers keep temporaries in cache and avoid page faults on
        # fresh allocations (the work is a few memory-bound passes). Adaptive: blocks at least as long as the histogram, whose passes dominate
        # otherwise. GPU: one block.
        block = max(1024, (1 << 18) // (n_vol * c))
        if adaptive:
            block = max(block, 2 * NUM_FINE_BINS)
        block = n_vox if dev.type != "cpu" else min(n_vox, block)
        fbuf, ibuf, dbuf = self._work_buffers(n_vol, c, block, p.dtype, dev)
        for s0 in range(0, n_vox, block):
            k = min(block, n_vox - s0)
            pc, lab = p3[:, :, s0 : s0 + k], lab3[:, :, s0 : s0 + k]
            # contiguous views on the head of the flat buffers (a last, shorter block included): `view(-1)` below
            fb = fbuf[: n_vol * c * k].view(n_vol, c, k)
            ib = ibuf[: n_vol * c * k].view(n_vol, c, k)

            if probability_error(pc, 1, atol=atol) is not None:
                check_probabilities(p, 1, atol=atol)  # the whole batch, for the full range in the message
                raise ValueError(probability_error(pc, 1, atol=atol))
            conf = pc.amax(1, keepdim=True)
            p_y = pc.gather(1, lab)
            # Top-label accuracy is [argmax = y]; argmax is slow on CPU and p_y == max agrees with it except at
            # exact ties, where argmax takes the first class: those few voxels get the exact rule.
            correct = p_y == conf
            is_max = pc == conf
            if int(is_max.sum()) > conf.numel():
                tie_n, _, tie_k = torch.nonzero(is_max.sum(1, keepdim=True) > 1, as_tuple=True)
                first = pc[tie_n, :, tie_k].argmax(1)
                correct[tie_n, 0, tie_k] = first == lab[tie_n, 0, tie_k]

            if adaptive:
                it = fine_bin_index(conf).add_(off_top)
                ih = fine_bin_index(p_y).add_((vol * c + lab) * stride)
                ib.copy_(fine_bin_index(pc)).add_(off_c)
            else:
                it = (conf * nb).long().add_(off_top)
                ih = (p_y * nb).long().add_((vol * c + lab) * stride)
                torch.mul(pc, nb, out=fb)
                ib.copy_(fb).add_(off_c)
            if dump3 is not None:
                # shifting by an offset is much cheaper on CPU than masked_fill_ with a broadcast mask
                dump = dbuf[: n_vol * k].view(n_vol, 1, k).copy_(dump3[:, :, s0 : s0 + k])
                it.add_(dump, alpha=size_top)
                ih.add_(dump, alpha=size_c)
                ib.add_(dump, alpha=size_c)
            it, ih, flat = it.view(-1), ih.view(-1), ib.view(-1)
            # sums in float64: float32 sums of ~1e5 confidences near 1 drift by ~1e-3 (round-to-ulp bias), and
            # stop growing past 2^24 voxels in a bin (GPU: one block)
            top_n += torch.bincount(it, minlength=2 * size_top)
            top_s[0].scatter_add_(0, it, conf.view(-1).double())
            top_s[1].scatter_add_(0, it, correct.view(-1).double())
            ovr_n[0] += torch.bincount(flat, minlength=2 * size_c)
            ovr_n[1] += torch.bincount(ih, minlength=2 * size_c)
            ovr_s.scatter_add_(0, flat, pc.reshape(-1).double())

            # sum_c (p_c - y_c)^2 = sum_c p_c^2 - 2 p_y + 1
            sq = (pc * pc).sum(1, keepdim=True)
            per_voxel = torch.cat([torch.ones_like(p_y), -torch.log(p_y.clamp_min(1e-12)), sq - 2 * p_y + 1], 1)
            if dump3 is not None:
                per_voxel.mul_(valid3[:, :, s0 : s0 + k])
            scalars += per_voxel.sum(-1, dtype=torch.float64)

        if not bool(torch.isfinite(scalars).all()):
            raise ValueError("y_pred contains NaN or Inf.")

        def fold(n: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, size: int, shape: tuple[int, ...]):
            h = torch.stack([n[:size].to(torch.float64), s1[:size], s2[:size]]).reshape(3, *shape, stride)
            if not adaptive:
                h = torch.cat([h[..., : nb - 1], h[..., nb - 1 :].sum(-1, keepdim=True)], -1)
            return h.transpose(0, 1)

        top = fold(top_n, top_s[0], top_s[1], size_top, (n_vol,))
        ovr = fold(ovr_n[0], ovr_s, ovr_n[1].to(torch.float64), size_c, (n_vol, c))
        return BinStatistics(top.cpu(), ovr.cpu(), scalars.cpu(), nb if adaptive else None)

    def _work_buffers(self, n_vol: int, c: int, block: int, dtype: torch.dtype, dev: torch.device):
        """Flat scratch buffers reused across updates (a few MB): fresh large allocations cost page faults. A
        block takes contiguous views on their heads."""
        key = (n_vol, c, block, dtype, dev)
        if self._buffers_key != key:
            self._buffers = (
                torch.empty(n_vol * c * block, dtype=dtype, device=dev),
                torch.empty(n_vol * c * block, dtype=torch.long, device=dev),
                torch.empty(n_vol * block, dtype=torch.long, device=dev),
            )
            self._buffers_key = key
        return self._buffers

    def _accumulate(self, stats: BinStatistics) -> None:
        pooled = stats.pooled()
        self._pooled.top += pooled.top
        self._pooled.ovr += pooled.ovr
        self._pooled.scalars += pooled.scalars
        per_vol = calibration_errors(stats)
        has_voxels = stats.scalars[:, 0] > 0
        if not bool(has_voxels.all()):
            warnings.warn(
                f"{int((~has_voxels).sum())} volume(s) have no voxel under mask={self.mask!r}: they are counted in "
                "'n_empty' and left out of the macro average.",
                stacklevel=3,
            )
        values = torch.stack([per_vol[k] for k in self.keys], 1)  # V, K
        self._macro_sum += torch.where(has_voxels[:, None], values, torch.zeros_like(values)).sum(0)
        self._counts += torch.tensor([float(has_voxels.sum()), float((~has_voxels).sum())], dtype=torch.float64)
        if self.per_volume:
            self._volumes += [dict(zip(self.keys, row)) for row in values.tolist()]

    def _synced(self) -> tuple[BinStatistics, torch.Tensor, torch.Tensor]:
        em = self._pooled.equal_mass_bins
        stats = BinStatistics(self._pooled.top.clone(), self._pooled.ovr.clone(), self._pooled.scalars.clone(), em)
        macro, counts = self._macro_sum.clone(), self._counts.clone()
        if self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([stats.top.flatten(), stats.ovr.flatten(), stats.scalars.flatten(), macro, counts])
            flat = flat.to(get_dist_device())  # NCCL reduces on the process's GPU, gloo on the CPU
            dist.all_reduce(flat)
            flat = flat.cpu()
            sizes = [stats.top.numel(), stats.ovr.numel(), stats.scalars.numel(), macro.numel(), counts.numel()]
            top, ovr, sca, macro, counts = torch.split(flat, sizes)
            stats = BinStatistics(top.view_as(stats.top), ovr.view_as(stats.ovr), sca.view_as(stats.scalars), em)
        return stats, macro, counts

    def aggregate(self, reduction: str = "macro") -> dict[str, float]:
        """Metrics over everything seen since :meth:`reset` (summed over processes when distributed).

        Args:
            reduction: ``"macro"``: per-volume metrics averaged over volumes that have voxels under the
                mask; ``"micro"``: metrics of all voxels pooled.

        Returns:
            dict with ``ece, ace, mce, cece, nll, brier`` (adaptive binning: also ``ece_bound, ace_bound,
            mce_bound, cece_bound``, macro-averaged like the values) and ``n_volumes`` (volumes averaged),
            ``n_empty`` (volumes without voxels under the mask) and ``n_voxels``. Values are NaN only when no
            voxel counted.

        Raises:
            ValueError: ``reduction`` not ``"macro"`` or ``"micro"``.
        """
        if reduction not in ("macro", "micro"):
            raise ValueError(f"reduction must be 'macro' or 'micro', got {reduction!r}.")
        stats, macro, counts = self._synced()
        if reduction == "micro":
            out = {k: float(v[0]) for k, v in calibration_errors(stats).items()}
        else:
            n = counts[0].item()
            out = {k: (macro[i].item() / n if n > 0 else float("nan")) for i, k in enumerate(self.keys)}
        out.update(n_volumes=int(counts[0]), n_empty=int(counts[1]), n_voxels=int(stats.scalars[0, 0]))
        return out

    def bin_statistics(self) -> BinStatistics:
        """Pooled (and process-summed) bin statistics for reliability diagrams: the ``num_bins`` bins of the
        metric (for adaptive binning, the equal-mass bins formed from the pooled fine histogram)."""
        return self._synced()[0].equal_mass()

    def get_per_volume(self) -> list[dict[str, float]]:
        """Metric values of each volume seen by this process (needs ``per_volume=True``)."""
        if not self.per_volume:
            raise ValueError("per-volume values are kept only with per_volume=True.")
        return list(self._volumes)
