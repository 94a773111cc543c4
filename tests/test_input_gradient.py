"""The ``input_gradient`` term ("right for the right reasons") against a hand computation."""

import pytest
import torch

from kdtoolkit.builtin.input_gradient import InputGradientLoss
from kdtoolkit.errors import KdError
from kdtoolkit.plugins.loss import LossContext
from kdtoolkit.plugins.manager import registries


def linear_case():
    """A linear model z = W·vec(x) + b on 2×1×4×4 images: ∂(Σ_k log p_k)/∂x = Wᵀ(1 − K·p)."""
    torch.manual_seed(0)
    weight, bias = torch.randn(3, 16), torch.randn(3)
    images = torch.randn(2, 1, 4, 4, requires_grad=True)
    logits = images.flatten(1) @ weight.T + bias
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, :, :2, :2] = 1
    masks[1, :, 1:, 1:] = 1
    ctx = LossContext(None, images, images, logits, torch.tensor([0, 2]), None, masks)
    p = torch.softmax(logits.detach(), dim=1)
    grad = ((1 - 3 * p) @ weight).view(2, 1, 4, 4)
    outside = ((1 - masks) * grad).pow(2).flatten(1)
    return ctx, outside


def test_input_gradient_by_hand():
    ctx, outside = linear_case()
    torch.testing.assert_close(InputGradientLoss()(ctx), outside.sum(1).mean())
    ctx, outside = linear_case()
    value = InputGradientLoss(normalize="mean")(ctx)
    torch.testing.assert_close(value, outside.mean(1).mean())
    value.backward()  # second order: the penalty trains the model's weights through x's grad
    assert ctx.images.grad is not None and torch.isfinite(ctx.images.grad).all()


def test_input_gradient_is_zero_when_the_mask_covers_everything():
    ctx, _ = linear_case()
    ctx.masks = torch.ones_like(ctx.masks)
    assert float(InputGradientLoss()(ctx)) == 0.0


def test_input_gradient_refusals_and_registration():
    assert registries().losses.get("input_gradient") is InputGradientLoss
    assert InputGradientLoss.needs_input_grad
    with pytest.raises(KdError, match="normalize must be 'mean' or 'sum', not 'max'"):
        InputGradientLoss(normalize="max")
    ctx, _ = linear_case()
    ctx.masks = None
    with pytest.raises(KdError, match="needs ROI masks"):
        InputGradientLoss()(ctx)
    ctx, _ = linear_case()
    ctx.images = ctx.images.detach()
    with pytest.raises(KdError, match="require grad"):
        InputGradientLoss()(ctx)


def test_input_gradient_moves_a_model_off_a_decoy():
    """Ross et al.'s decoy case, by hand: the label is written both inside the ROI (a signal)
    and outside it (a decoy, a cleaner copy). Cross-entropy alone leans on both; with the
    input-gradient penalty outside the mask, the weight on the decoy falls to near 0 while the
    signal carries the decision."""
    generator = torch.Generator().manual_seed(0)
    n = 256
    y = torch.randint(0, 2, (n,), generator=generator)
    sign = 2.0 * y - 1
    x = torch.zeros(n, 1, 1, 2)
    x[:, 0, 0, 0] = sign + 0.8 * torch.randn(n, generator=generator)  # the ROI: a noisy signal
    x[:, 0, 0, 1] = sign + 0.1 * torch.randn(n, generator=generator)  # outside: a clean decoy
    masks = torch.zeros(n, 1, 1, 2)
    masks[..., 0] = 1

    def train(weight: float) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        term = InputGradientLoss()
        for _ in range(300):
            images = x.clone().requires_grad_(True)
            logits = model(images.flatten(1))
            ctx = LossContext(None, images, images, logits, y, None, masks)
            loss = torch.nn.functional.cross_entropy(logits, y) + weight * term(ctx)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return model.weight.detach()

    plain, guided = train(0.0), train(10.0)
    decoy = lambda w: float((w[1, 1] - w[0, 1]).abs())  # noqa: E731 - the decoy's margin weight
    signal = lambda w: float((w[1, 0] - w[0, 0]).abs())  # noqa: E731
    assert decoy(plain) > signal(plain)  # without guidance the clean decoy dominates
    assert decoy(guided) < 0.1 * decoy(plain)
    assert signal(guided) > decoy(guided)
