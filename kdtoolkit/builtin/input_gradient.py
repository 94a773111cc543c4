"""Built-in plugin: ``input_gradient``, input-gradient guidance ("right for the right
reasons", Ross, Hughes & Doshi-Velez, IJCAI 2017).

The gradient of the summed log-probabilities with respect to the input pixels is penalised
outside the ROI mask, so the student's decision may depend on the ROI but not on what lies
elsewhere (a decoy, a global cue)::

    g = ∂(Σ_k log softmax(z)_k) / ∂x                 B×C×H×W, per sample
    L = mean_b Σ_{c,i,j} ((1 − M_bij) · g_bcij)²      normalize = "sum" (default, Ross et al.)
    L = mean_b mean_{c,i,j} ((1 − M_bij) · g_bcij)²   normalize = "mean"

Training it differentiates the model twice (``create_graph``), through the whole trunk: eager
models in one process only, about three times the cost of a plain step. Under BatchNorm in
training mode the batch statistics couple the samples, so ``g_b`` also holds ``x_b``'s small
(order 1/B) share in the other samples' scores through those statistics.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdtoolkit.builtin.losses import require_eager_one_process
from kdtoolkit.errors import KdError
from kdtoolkit.plugins.hookspec import hookimpl
from kdtoolkit.plugins.loss import LossContext, LossTerm


class InputGradientLoss(LossTerm):
    """Input-gradient guidance: the squared gradient of ``Σ_k log p_k`` with respect to the
    input, outside the ROI mask M (``1 − M``), summed (``normalize = "sum"``) or averaged
    (``"mean"``) over channels and pixels, then averaged over the batch."""

    needs_input_grad: ClassVar[bool] = True

    def __init__(self, normalize: Literal["mean", "sum"] = "sum") -> None:
        super().__init__()
        if normalize not in ("mean", "sum"):
            raise KdError(
                f"loss 'input_gradient': normalize must be 'mean' or 'sum', not {normalize!r}"
            )
        self.normalize = normalize

    def bind(self, student: nn.Module) -> None:
        require_eager_one_process(student, "name = 'input_gradient'")

    def forward(self, ctx: LossContext) -> torch.Tensor:
        if ctx.masks is None:
            raise KdError("loss 'input_gradient' needs ROI masks, but the batch has none")
        if not ctx.images.requires_grad:
            raise KdError(
                "loss 'input_gradient' needs images that require grad (the engine sets this for "
                "terms with needs_input_grad, in training only)"
            )
        log_p = F.log_softmax(ctx.logits.float(), dim=1).sum()
        (grad,) = torch.autograd.grad(log_p, ctx.images, create_graph=True, retain_graph=True)
        masks = ctx.masks.float() if ctx.masks.ndim == 4 else ctx.masks.float()[:, None]
        outside = (1 - masks) * grad.float()
        per_sample = outside.pow(2).flatten(1)
        per_sample = per_sample.mean(1) if self.normalize == "mean" else per_sample.sum(1)
        return per_sample.mean()


@hookimpl
def kd_register_losses(registry):
    registry.register("input_gradient", InputGradientLoss)
