"""Temperature scaling (Guo et al., ICML 2017) for segmentation networks.

The temperature is part of the network: :class:`TemperatureScaled` wraps any MONAI network and divides its
logits by a registered buffer, so every consumer of a bundle's ``network_def`` (``monai.bundle run``,
TorchScript export, MONAI Label) gets calibrated probabilities, and the weights stay a plain state_dict.

Fitting never holds all voxels: :class:`TemperatureFitter` keeps a fixed-size random sample of voxel logits
per volume, then minimises their NLL over ``log T`` within bounds.

One global ``T`` is fitted mostly on easy background voxels, which are already well calibrated, so it barely
corrects the over-confident voxels at the structures (docs/calibration.md). With ``foreground_margin`` there
are two temperatures: one for voxels within that many voxels of the *predicted* foreground (known at
inference, no ground truth needed) and one for the rest, each fitted on its own voxels.

A temperature belongs to the weights it was fitted for: :class:`TemperatureScaled` keeps a fingerprint of
those weights (buffer ``calibrated_for``, set by :meth:`TemperatureScaled.set_temperature`) and warns when a
state_dict is loaded whose weights differ from the ones its temperature was fitted for.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_nacl.distributed import all_gather_rows, all_reduce_sum, world_size
from monai_nacl.input_checks import as_tensor, labels_from_target
from monai_nacl.metrics.calibration import CalibrationMetric

__all__ = [
    "compose_temperature",
    "near_foreground",
    "apply_temperature",
    "TemperatureScaled",
    "TemperatureFitter",
    "fit_temperature",
    "T_MIN",
    "T_MAX",
    "weights_fingerprint",
    "StaleTemperatureWarning",
]

T_MIN, T_MAX = 0.05, 20.0


class StaleTemperatureWarning(UserWarning):
    """Loaded weights differ from the weights their temperature was fitted for: probabilities are not calibrated."""


def weights_fingerprint(weights: nn.Module | Mapping[str, torch.Tensor]) -> int:
    """A 63-bit fingerprint of a network's weights (names, dtypes, shapes and values), never 0.

    Args:
        weights: a module, or a state_dict. A :class:`TemperatureScaled` (or its state_dict, recognised by its
            ``temperature`` entry) is fingerprinted by its inner network only, so the temperature and the
            fingerprint buffer do not count: a module and its saved state_dict give the same value on any device
            (the dtype counts: a ``.half()`` copy is other weights).
    """
    if isinstance(weights, nn.Module):
        if isinstance(weights, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            weights = weights.module
        if isinstance(weights, TemperatureScaled):
            weights = weights.network
        state = weights.state_dict()
    else:
        state = dict(weights)
        if "temperature" in state:
            state = {k[len("network.") :]: v for k, v in state.items() if k.startswith("network.")}
    h = hashlib.blake2b(digest_size=8)
    for name, value in sorted(state.items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return (int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)) or 1


def near_foreground(logits: torch.Tensor, margin: int) -> torch.Tensor:
    """``B,1,*spatial`` mask of the voxels within ``margin`` voxels (Chebyshev distance) of the predicted
    foreground: ``argmax`` over channels is not 0. Unchanged by any positive temperature."""
    fg = (logits.argmax(1, keepdim=True) != 0).float()  # float32: CPU max pooling lacks half kernels
    if margin > 0:
        k = 2 * margin + 1
        if fg.dim() == 5:
            fg = F.max_pool3d(fg, k, 1, margin)
        elif fg.dim() == 4:
            fg = F.max_pool2d(fg, k, 1, margin)
        else:
            fg = F.max_pool1d(fg, k, 1, margin)
    return fg > 0


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor, foreground_margin: int | None = None):
    """``logits`` divided by ``temperature``: one value, one per channel, or (with ``foreground_margin``)
    ``[elsewhere, near the predicted foreground]`` chosen per voxel by :func:`near_foreground`."""
    t = torch.as_tensor(temperature, device=logits.device).to(logits.dtype)
    if foreground_margin is not None:
        return logits / torch.where(near_foreground(logits, foreground_margin), t[1], t[0])
    for _ in range(logits.dim() - 2):
        t = t.unsqueeze(-1)
    return logits / t


def _check_margin(foreground_margin: int | None) -> int | None:
    if foreground_margin is None:
        return None
    if int(foreground_margin) != foreground_margin or foreground_margin < 0:
        raise ValueError(f"foreground_margin must be a non-negative integer, got {foreground_margin!r}.")
    return int(foreground_margin)


class TemperatureScaled(nn.Module):
    """``network(x) / T``, with ``T`` a buffer: one value, one per class along the channel axis, or two values
    ``[elsewhere, near the predicted foreground]``.

    Args:
        network: any module returning logits ``B,C,*spatial``.
        num_classes: required with ``per_class=True`` (size of ``T``).
        per_class: one temperature per class instead of a global one.
        temperature: initial value(s) (1.0 leaves the network unchanged).
        dropout: if given, the probability set on every ``nn.Dropout*`` module of ``network`` (MONAI Label
            sets ``network_def#dropout`` for epistemic scoring; MONAI's UNet keeps ``p=0`` dropout modules).
        foreground_margin: if given, voxels within this many voxels of the predicted foreground (channel 0 is
            background; see :func:`near_foreground`) are divided by ``T[1]``, the others by ``T[0]``. The
            segmentation is unchanged; a stored single ``T`` loads as both values.

    ``T`` applies except in training with gradients: there ``forward`` returns the raw logits, so a network
    fine-tuned from calibrated weights trains exactly as one trained from scratch, and the temperature is refitted
    for the new weights afterwards. The buffer ``calibrated_for`` holds :func:`weights_fingerprint` of the weights
    ``T`` was last set for (0: never set); loading a state_dict whose weights differ from it warns with
    :class:`StaleTemperatureWarning`. Loading checks the stored temperatures (finite, within
    ``[T_MIN, T_MAX]``) and names the problem when the state_dict is that of a bare network.

    Raises:
        ValueError: ``per_class`` without ``num_classes`` or together with ``foreground_margin``, a negative
            margin, or a temperature outside ``[T_MIN, T_MAX]``.

    Example:
        >>> from monai.networks.nets import UNet
        >>> net = TemperatureScaled(UNet(3, 1, 3, channels=(8, 16), strides=(2,)))
        >>> net.temperature
        tensor([1.])
        >>> TemperatureScaled(UNet(3, 1, 3, channels=(8, 16), strides=(2,)), foreground_margin=1).temperature
        tensor([1., 1.])
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int | None = None,
        per_class: bool = False,
        temperature: float | torch.Tensor = 1.0,
        dropout: float | None = None,
        foreground_margin: int | None = None,
    ) -> None:
        super().__init__()
        if per_class and not num_classes:
            raise ValueError("per_class=True needs num_classes.")
        if foreground_margin is not None and per_class:
            raise ValueError("per_class and foreground_margin cannot be combined.")
        foreground_margin = _check_margin(foreground_margin)
        size = int(num_classes) if per_class else (1 if foreground_margin is None else 2)
        t = torch.as_tensor(temperature, dtype=torch.float32).flatten().expand(size).clone()
        _check_temperature(t)
        self.network = network
        self.foreground_margin = foreground_margin
        self.register_buffer("temperature", t)
        self.register_buffer("calibrated_for", torch.zeros((), dtype=torch.int64))
        self.register_load_state_dict_post_hook(_warn_if_stale)
        if dropout is not None:
            if not 0.0 <= float(dropout) < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
            for m in self.network.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.p = float(dropout)

    def set_temperature(self, temperature: float | torch.Tensor) -> None:
        """Replace ``T`` (same size as the buffer; a single value is broadcast) and record that it was set for
        the current weights (``calibrated_for``)."""
        t = torch.as_tensor(temperature, dtype=self.temperature.dtype, device=self.temperature.device).flatten()
        if t.numel() not in (1, self.temperature.numel()):
            raise ValueError(f"temperature must have 1 or {self.temperature.numel()} values, got {t.numel()}.")
        t = t.expand(self.temperature.numel()).clone()
        _check_temperature(t)
        self.temperature.copy_(t)
        self.calibrated_for.fill_(weights_fingerprint(self.network))

    def is_calibrated_for_current_weights(self) -> bool:
        """Whether ``T`` was set for exactly the current weights (``False`` if it was never set)."""
        return int(self.calibrated_for) == weights_fingerprint(self.network)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x)
        if self.training and torch.is_grad_enabled():  # training; MC-dropout sampling (no grad) keeps T
            return logits
        return apply_temperature(logits, self.temperature, self.foreground_margin)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        key = prefix + "temperature"
        stored = state_dict.get(key)
        inner = prefix + "network."
        if stored is None and not any(k.startswith(inner) for k in state_dict) and state_dict:
            self._load_failed = True
            error_msgs.append(
                "the state_dict has no 'temperature' and no 'network.*' keys: it looks like the state_dict of a bare "
                "network; load it with `wrapper.network.load_state_dict(state)` (then fit or set the temperature), "
                "or save `wrapper.state_dict()`."
            )
            return
        if prefix + "calibrated_for" not in state_dict:
            state_dict[prefix + "calibrated_for"] = torch.zeros((), dtype=torch.int64)  # saved before fingerprints
        if stored is not None:
            bad = _temperature_problem(stored)
            if bad:
                self._load_failed = True
                error_msgs.append(f"{key}: {bad}")
                return
        if stored is not None and stored.numel() == 1 and self.temperature.numel() == 2:
            # weights calibrated with one global T (or not at all) load into the two-temperature form
            state_dict[key] = stored.flatten().expand(2).clone()
        elif stored is not None and stored.numel() == 2 and self.temperature.numel() == 1:
            error_msgs.append(
                f"{key} holds two temperatures [elsewhere, near the predicted foreground]: these weights were "
                "calibrated with foreground_margin set; build TemperatureScaled with the same foreground_margin."
            )
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs)


def _temperature_problem(t: torch.Tensor) -> str | None:
    if not torch.is_floating_point(t):
        return f"temperature must be a floating-point tensor, got {t.dtype}."
    if not bool(torch.isfinite(t).all()) or bool((t < T_MIN).any()) or bool((t > T_MAX).any()):
        return f"temperature must be finite and in [{T_MIN}, {T_MAX}], got {t.tolist()}."
    return None


def _check_temperature(t: torch.Tensor) -> None:
    problem = _temperature_problem(t)
    if problem:
        raise ValueError(problem)


def _warn_if_stale(module: TemperatureScaled, incompatible) -> None:
    failed, module._load_failed = getattr(module, "_load_failed", False), False
    fitted_for = int(module.calibrated_for)
    if failed or fitted_for == 0 or incompatible.missing_keys or incompatible.unexpected_keys:
        return
    current = weights_fingerprint(module.network)
    if current != fitted_for:
        warnings.warn(
            f"the loaded temperature {module.temperature.tolist()} was fitted for other weights (fingerprint "
            f"{fitted_for:016x}, these are {current:016x}): the probabilities are not calibrated; refit the "
            "temperature (a bundle's calibrate.json) before trusting them.",
            StaleTemperatureWarning,
            stacklevel=3,
        )


class TemperatureFitter:
    """Collect a bounded random sample of voxel logits, then fit ``T`` by minimising NLL.

    Args:
        num_classes: number of classes ``C``.
        per_class: fit one temperature per class (vector scaling of the logits' channels).
        voxels_per_volume: voxels sampled uniformly (without replacement) from each volume's valid voxels.
        mask: ``"all"`` or ``"foreground"`` (ground truth != 0) voxels are eligible.
        ignore_index: label never sampled.
        max_voxels: cap on the total sample (reservoir-style thinning beyond it).
        seed: sampling seed.
        foreground_margin: fit ``[T elsewhere, T near the predicted foreground]`` as
            :class:`TemperatureScaled` with the same margin applies them; ``voxels_per_volume`` are then sampled
            from each of the two regions (needs ``mask="all"``).

    Example:
        >>> fitter = TemperatureFitter(num_classes=3)
        >>> fitter.update(torch.randn(2, 3, 8, 8, 8) * 5, torch.randint(0, 3, (2, 1, 8, 8, 8)))
        >>> t = fitter.fit()
    """

    def __init__(
        self,
        num_classes: int,
        per_class: bool = False,
        voxels_per_volume: int = 20000,
        mask: str = "all",
        ignore_index: int | None = None,
        max_voxels: int = 2_000_000,
        seed: int = 0,
        foreground_margin: int | None = None,
    ) -> None:
        if mask not in ("all", "foreground"):
            raise ValueError(f"mask must be 'all' or 'foreground', got {mask!r}.")
        if foreground_margin is not None and (mask != "all" or per_class):
            raise ValueError("foreground_margin needs mask='all' and per_class=False: it splits all voxels in two.")
        self.foreground_margin = _check_margin(foreground_margin)
        self.num_classes, self.per_class, self.mask = int(num_classes), per_class, mask
        self.voxels_per_volume, self.ignore_index, self.max_voxels = (
            int(voxels_per_volume),
            ignore_index,
            int(max_voxels),
        )
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.reset()

    @classmethod
    def for_network(cls, network: nn.Module, num_classes: int, **kwargs) -> TemperatureFitter:
        """A fitter of the form of ``network``'s temperature: one T, two (``foreground_margin``), or one per
        class; ``kwargs`` as the constructor's.

        Raises:
            ValueError: ``network`` is not a :class:`TemperatureScaled`, or ``foreground_margin`` differs from it.
        """
        if not isinstance(network, TemperatureScaled):
            raise ValueError(
                f"network must be a monai_nacl.temperature.TemperatureScaled, got {type(network).__name__}: only a "
                "network with a temperature can be calibrated."
            )
        kwargs.setdefault("per_class", network.foreground_margin is None and network.temperature.numel() > 1)
        margin = kwargs.setdefault("foreground_margin", network.foreground_margin)
        if margin != network.foreground_margin:
            raise ValueError(
                f"foreground_margin={margin} differs from the network's ({network.foreground_margin}): the fitted "
                "temperatures would be applied to other voxels than they were fitted on."
            )
        return cls(num_classes, **kwargs)

    def reset(self) -> None:
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._regions: list[torch.Tensor] = []  # 1 = near the predicted foreground (with foreground_margin)
        self._count = 0
        self.num_volumes = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add volumes: logits ``B,C,*spatial`` (before softmax), labels ``B,1,*spatial`` or one-hot."""
        logits = as_tensor(logits).detach()
        if logits.ndim < 3 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be B,{self.num_classes},*spatial, got {tuple(logits.shape)}.")
        labels = labels_from_target(as_tensor(target).to(logits.device), logits, self.num_classes, self.ignore_index)
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("logits contain NaN or Inf.")
        self.num_volumes += logits.shape[0]
        for b in range(logits.shape[0]):
            z = logits[b].reshape(self.num_classes, -1)
            y = labels[b].reshape(-1)
            keep = torch.ones_like(y, dtype=torch.bool)
            if self.ignore_index is not None:
                keep &= y != self.ignore_index
            if self.mask == "foreground":
                keep &= y != 0
            if self.foreground_margin is None:
                near = torch.zeros_like(keep)
                groups = [self._sample(keep)]
            else:
                near = near_foreground(logits[b : b + 1], self.foreground_margin).reshape(-1)
                groups = [self._sample(keep & ~near), self._sample(keep & near)]
            idx = torch.cat(groups).to(z.device)
            self._logits.append(z[:, idx].T.float().cpu())
            self._labels.append(y[idx].long().cpu())
            self._regions.append(near[idx].cpu())
            self._count += idx.numel()
        if self._count > self.max_voxels:
            z, y, r = torch.cat(self._logits), torch.cat(self._labels), torch.cat(self._regions)
            keep = torch.randperm(z.shape[0], generator=self.generator)[: self.max_voxels]
            self._logits, self._labels, self._regions = [z[keep]], [y[keep]], [r[keep]]
            self._count = self.max_voxels

    def all_gather(self) -> None:
        """Replace this process's voxel sample by the samples of every process (``torch.distributed``), in rank
        order, so that :meth:`fit` on any rank fits on the voxels of all the volumes, and every rank fits the same
        temperature; a no-op on one process. Every process must call it (a collective), also one that saw no volume.

        Each rank sampled its volumes with its own generator: another uniform sample than one process would draw.
        Beyond ``max_voxels`` in all, the sample is thinned with a generator seeded by ``seed``, the same on every
        rank.
        """
        if world_size() < 2:
            return
        C = self.num_classes
        z = torch.cat(self._logits) if self._logits else torch.zeros(0, C, dtype=torch.float32)
        y = torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.int64)
        r = torch.cat(self._regions) if self._regions else torch.zeros(0, dtype=torch.bool)
        z, y, r = (torch.cat(all_gather_rows(t)) for t in (z.float(), y.long(), r.bool()))
        self.num_volumes = int(all_reduce_sum(torch.tensor([self.num_volumes], dtype=torch.int64)))
        if z.shape[0] > self.max_voxels:
            keep = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(self.seed))[: self.max_voxels]
            z, y, r = z[keep], y[keep], r[keep]
        self._logits, self._labels, self._regions = [z], [y], [r]
        self._count = z.shape[0]

    def update_batch(self, logits, target) -> None:
        """:meth:`update` with a batch, or with the decollated lists of an ignite/MONAI engine's output."""
        if isinstance(logits, (list, tuple)):
            for z, y in zip(logits, target):
                self.update(torch.as_tensor(z)[None], torch.as_tensor(y)[None])
        else:
            self.update(logits, target)

    def _sample(self, eligible: torch.Tensor) -> torch.Tensor:
        idx = torch.nonzero(eligible.cpu()).flatten()
        if idx.numel() > self.voxels_per_volume:
            idx = idx[torch.randperm(idx.numel(), generator=self.generator)[: self.voxels_per_volume]]
        return idx

    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampled ``(logits N,C, labels N)``."""
        if not self._logits or self._count == 0:
            raise ValueError(
                f"no voxel to fit on: {len(self._logits)} volume(s) seen, none with an eligible voxel (mask="
                f"{self.mask!r}, ignore_index={self.ignore_index}); nothing can be fitted."
            )
        return torch.cat(self._logits), torch.cat(self._labels)

    @property
    def num_voxels(self) -> int:
        """Voxels in the current sample."""
        return self._count

    def score(self, correction: torch.Tensor | None = None) -> dict[str, float]:
        """NLL and top-label ECE (15 bins, :class:`~monai_nacl.metrics.CalibrationMetric` with ``sync=False``: the
        sample lives on this rank) of the sampled voxels, as collected or divided by ``correction`` (a result of
        :meth:`fit`). With ``foreground_margin`` the two regions are sampled equally, so these describe the
        sample, not a whole volume."""
        z, y = self.samples()
        if correction is not None:
            t = torch.as_tensor(correction, dtype=z.dtype).flatten()
            if self.foreground_margin is not None:
                z = z / torch.where(torch.cat(self._regions)[:, None], t[1], t[0])
            else:
                z = z / t
        # one ECE definition for the package; rank-local (sync=False): the sample lives on this rank only
        metric = CalibrationMetric(self.num_classes, mask="all", sync=False)
        metric(torch.softmax(z, 1).T.contiguous()[None], y[None, None])
        return {"nll": float(F.cross_entropy(z, y)), "ece": metric.aggregate("micro")["ece"]}

    def fit(self, max_iter: int = 100) -> torch.Tensor:
        """Return the fitted temperature (shape ``1``, ``C``, or ``2`` with ``foreground_margin``) within
        ``[T_MIN, T_MAX]``. A region without sampled voxels keeps ``T = 1`` (with a warning)."""
        z, y = self.samples()
        z = z.double()
        lo, hi = math.log(T_MIN), math.log(T_MAX)

        def nll(log_t: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(z / log_t.exp(), y)

        if self.foreground_margin is not None:
            regions = torch.cat(self._regions)
            t = torch.ones(2)
            for r, name in enumerate(("away from", "near")):
                sel = regions == bool(r)
                if bool(sel.any()):
                    t[r] = _fit_global(z[sel], y[sel], max_iter)
                else:
                    warnings.warn(f"no voxel {name} the predicted foreground was sampled: its T stays 1.", stacklevel=2)
            return t
        if not self.per_class:
            return torch.tensor([_fit_global(z, y, max_iter)], dtype=torch.float32)

        log_t = torch.zeros(self.num_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = nll(log_t.clamp(lo, hi))
            loss.backward()
            return loss

        opt.step(closure)
        return log_t.detach().clamp(lo, hi).exp().float()


def _fit_global(z: torch.Tensor, y: torch.Tensor, max_iter: int) -> float:
    """The ``T`` in ``[T_MIN, T_MAX]`` minimising the NLL of logits ``z`` (N,C) for labels ``y``. NLL is convex
    in 1/T, hence unimodal in log T: golden-section search on the bounded interval."""

    def nll(log_t: float) -> torch.Tensor:
        return F.cross_entropy(z / math.exp(log_t), y)

    a, b = math.log(T_MIN), math.log(T_MAX)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(max_iter):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
        if b - a < 1e-6:
            break
    return math.exp((a + b) / 2)


@torch.no_grad()
def fit_temperature(
    network: nn.Module,
    data: Iterable[dict],
    num_classes: int,
    inferer: Callable[[torch.Tensor, nn.Module], torch.Tensor] | None = None,
    image_key: str = "image",
    label_key: str = "label",
    device: str | torch.device | None = None,
    **fitter_kwargs,
) -> torch.Tensor:
    """Run ``network`` (through ``inferer``, e.g. a ``SlidingWindowInferer``) over ``data`` and fit ``T``.

    If ``network`` is a :class:`TemperatureScaled`, the returned value is the *total* temperature to set
    (the current one times the fitted correction), so ``network.set_temperature(result)`` is always right.
    """
    if isinstance(network, TemperatureScaled):
        fitter_kwargs.setdefault("foreground_margin", network.foreground_margin)
    fitter = TemperatureFitter(num_classes, **fitter_kwargs)
    device = torch.device(device) if device is not None else next(network.parameters()).device
    was_training = network.training
    network.eval()
    for batch in data:
        image = batch[image_key].to(device)
        logits = inferer(image, network) if inferer is not None else network(image)
        fitter.update(logits, batch[label_key])
    network.train(was_training)
    t = fitter.fit()
    return compose_temperature(network.temperature, t) if isinstance(network, TemperatureScaled) else t


def compose_temperature(current: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
    """The total temperature to set after fitting ``correction`` on logits already divided by ``current``:
    their product, kept within ``[T_MIN, T_MAX]`` (on the CPU)."""
    return (correction.detach().cpu() * current.detach().cpu()).clamp(T_MIN, T_MAX)
