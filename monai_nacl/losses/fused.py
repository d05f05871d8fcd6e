"""Fused cross-entropy + logit-penalty kernel shared by the NACL loss.

Autograd would keep the softmax, the one-hot and the penalty residual alive and run a separate backward
node for each. Here the forward already knows everything the gradient needs, so it writes the gradient
into the buffer that held ``exp(x - max)`` and the backward is a single scale: one forward pass structure
over the logits instead of two, and no extra tensors of logit size kept for backward.
"""

from __future__ import annotations

import torch

__all__ = ["fused_ce_penalty"]


class _FusedCEPenalty(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: torch.Tensor,
        index: torch.Tensor,
        tau: torch.Tensor,
        ce_weight: torch.Tensor | float,
        valid: torch.Tensor | None,
        pen_scale: float,
        alpha: float | torch.Tensor,
        distance: str,
        on_softmax: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        m = x.amax(1, keepdim=True)
        e = torch.sub(x, m).exp_()
        s = e.sum(1, keepdim=True)
        ce_vox = s.log().add_(m).sub_(x.gather(1, index))  # logsumexp - x_target, per voxel
        ce = (ce_vox * ce_weight).sum() if isinstance(ce_weight, torch.Tensor) else ce_vox.sum() * ce_weight

        if on_softmax:
            p = e.div_(s)
            d = torch.sub(p, tau)
        else:
            d = torch.sub(x, tau.to(x.dtype))
        if valid is not None:
            d.mul_(valid)
        per_class = isinstance(alpha, torch.Tensor)
        if per_class:
            # per-class weights: sum over every axis but the class axis, then weigh each class
            dims = [0, *range(2, d.ndim)]
            pen_c = torch.linalg.vector_norm(d, 1 if distance == "l1" else 2, dim=dims)
            pen_c = pen_c if distance == "l1" else pen_c.square()
            lam = alpha.to(device=pen_c.device, dtype=pen_c.dtype)
            pen = pen_c.sum() * pen_scale
            total = ce + (lam * pen_c).sum() * pen_scale
        else:
            if distance == "l1":
                pen = torch.linalg.vector_norm(d, 1)
            else:
                pen = torch.linalg.vector_norm(d, 2).square()
            pen = pen * pen_scale
            total = ce + alpha * pen
        dpen = d.sign_() if distance == "l1" else d.mul_(2.0)

        if ctx.needs_input_grad[0]:
            # the penalty's gradient factor: a scalar, or one value per class broadcast over B and the voxels
            k = (lam * pen_scale).view(1, -1, *([1] * (d.ndim - 2))) if per_class else alpha * pen_scale
            if on_softmax:
                # d/dx of sum_c f(p_c): p * (g - <p, g>), with g the derivative w.r.t. p.
                gp = dpen.mul_(k)
                gp.sub_((gp * p).sum(1, keepdim=True)).mul_(p)
                g = p.mul_(ce_weight).add_(gp)
            else:
                # softmax * w + k * sign(d), then -w at the target class
                g = e.mul_(ce_weight / s if isinstance(ce_weight, torch.Tensor) else s.reciprocal().mul_(ce_weight))
                if per_class:
                    g.add_(dpen.mul_(k))
                else:
                    g.add_(dpen, alpha=k)
            w = ce_weight if isinstance(ce_weight, torch.Tensor) else torch.full_like(ce_vox, ce_weight)
            g.scatter_add_(1, index, w.neg().to(g.dtype).expand_as(ce_vox))
            ctx.save_for_backward(g)
            ctx.out_dtype = logits.dtype
        return total, ce.detach(), pen.detach()

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _g_ce: torch.Tensor, _g_pen: torch.Tensor):  # type: ignore[override]
        (g,) = ctx.saved_tensors
        if g.device.type == "cpu" and float(grad_total) == 1.0:
            grad = g
        else:
            grad = g * grad_total
        return grad.to(ctx.out_dtype), None, None, None, None, None, None, None, None


def fused_ce_penalty(
    logits: torch.Tensor,
    index: torch.Tensor,
    tau: torch.Tensor,
    ce_weight: torch.Tensor | float,
    valid: torch.Tensor | None,
    pen_scale: float,
    alpha: float | torch.Tensor,
    distance: str = "l1",
    on_softmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``total = sum_i w_i CE_i + pen_scale * sum_{i,c} alpha_c d(tau_ic, z_ic)`` with a fused gradient.

    Args:
        logits: ``B,C,*spatial``.
        index: int64 class index ``B,1,*spatial`` (any valid class at ignored voxels; their weight is 0).
        tau: prior ``B,C,*spatial``.
        ce_weight: per-voxel CE weight ``B,1,*spatial`` (class weight, validity and normaliser folded in) or
            a scalar normaliser.
        valid: ``B,1,*spatial`` 0/1 mask of voxels that count in the penalty, or ``None`` for all.
        pen_scale: normaliser of the penalty sum (``1 / (N C)`` for the mean).
        alpha: penalty weight: a float (every class), or a tensor of ``C`` per-class weights ``alpha_c``.
        distance: ``"l1"`` or ``"l2"``.
        on_softmax: penalise softmax probabilities instead of logits.

    Returns:
        ``(total, ce, penalty)``; only ``total`` carries a gradient. ``penalty`` is the unweighted
        ``pen_scale * sum_{i,c} d(tau_ic, z_ic)`` in both forms.
    """
    return _FusedCEPenalty.apply(logits, index, tau, ce_weight, valid, pen_scale, alpha, distance, on_softmax)
