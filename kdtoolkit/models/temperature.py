"""Temperature scaling (Guo et al. 2017): one scalar ``T`` divides a classifier's logits so
that its softmax probabilities are calibrated; fitted by minimising the negative
log-likelihood on held-back labelled logits (a fold's validation split, never its test fold).

:func:`probabilities_of` is the one place where a model's scores become probabilities
(``softmax(logits / T)``); :class:`Probabilities` (``kdtoolkit.KdModel``) and exports use it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

#: The range a fitted temperature is kept in: at most a 4× sharpening or softening of the
#: logits (a fit beyond it on a validation split is an overfit, not a calibration).
T_MIN, T_MAX = 0.25, 4.0
#: The fewest validation samples a temperature is fitted on (fewer: T = 1).
MIN_SAMPLES = 30
#: χ²(1) at 95%: the likelihood ratio a fitted T must reach against T = 1 to be kept.
LR_CRITICAL = 3.841


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / float(temperature)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return float(nn.functional.cross_entropy(z, y))


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, steps: int = 100, min_samples: int = MIN_SAMPLES
) -> float:
    """The temperature of :func:`temperature_fit` (1.0 where none is fitted)."""
    return temperature_fit(logits, labels, steps, min_samples)[0]


def temperature_fit(
    logits: np.ndarray, labels: np.ndarray, steps: int = 100, min_samples: int = MIN_SAMPLES
) -> tuple[float, str | None]:
    """(T, why none was fitted): the temperature minimising the NLL of ``labels`` under
    ``softmax(logits / T)`` (LBFGS on ``log T``, float64), kept in [``T_MIN``, ``T_MAX``], and
    kept only when the data show the model miscalibrated: a likelihood-ratio test of T against
    T = 1 at the 5% level (``2·n·(NLL(1) − NLL(T)) ≥ LR_CRITICAL``), so a calibrated model
    keeps T = 1 in 95% of validation splits instead of taking the noise of a small one. T = 1
    with a one-line reason when there are fewer than ``min_samples`` logits, when every sample
    is classified right (the NLL then falls as T → 0 and has no minimum), or the test fails."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if reason := unfitted(logits, labels, min_samples):
        return 1.0, reason
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(z / log_t.clamp(-8, 8).exp(), y)
        loss.backward()
        return loss

    optimiser.step(closure)
    t = float(np.clip(math.exp(float(log_t.detach())), T_MIN, T_MAX))
    statistic = 2 * len(labels) * (nll(logits, labels, 1.0) - nll(logits, labels, t))
    if not math.isfinite(t) or not statistic >= LR_CRITICAL:
        return 1.0, (
            f"T = {t:.2f} is not distinguishable from 1 on {len(labels)} validation samples "
            f"(likelihood ratio {statistic:.2f} < {LR_CRITICAL}): T = 1 kept"
        )
    return t, None


def unfitted(logits: np.ndarray, labels: np.ndarray, min_samples: int = MIN_SAMPLES) -> str | None:
    """Why no temperature is fitted on these logits at all (one line), or None."""
    if len(logits) < min_samples:
        return (
            f"{len(logits)} validation samples (fewer than {min_samples}): no temperature "
            "fitted, T = 1"
        )
    if not np.isfinite(logits).all():
        return "non-finite validation logits: no temperature fitted, T = 1"
    if (logits.argmax(1) == labels).all():
        return "every validation sample classified right: no temperature fitted, T = 1"
    return None


def probabilities_of(logits: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """``softmax(logits / temperature)`` over classes (dim 1), in float32."""
    return torch.softmax(logits.float() / temperature, dim=1)


class Probabilities(nn.Module):
    """``softmax(model(x) / temperature)`` over classes (dim 1), in float32: the model's
    calibrated probabilities (``temperature`` 1: its plain softmax)."""

    def __init__(self, model: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The calibrated probabilities of the model's ``logits``."""
        return probabilities_of(logits, self.temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_logits(self.model(x))
