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

#: The range a fitted temperature is kept in.
T_MIN, T_MAX = 0.05, 100.0


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / float(temperature)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return float(nn.functional.cross_entropy(z, y))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, steps: int = 100) -> float:
    """The temperature minimising the NLL of ``labels`` under ``softmax(logits / T)``: LBFGS
    on ``log T`` (float64), kept in [``T_MIN``, ``T_MAX``]; 1.0 when there are no logits, when
    every sample is classified right (the NLL then falls as T → 0 and has no minimum: a fit
    would only sharpen the model to its bound), or when the fit does not lower the NLL at
    ``T = 1``."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if len(logits) == 0 or not np.isfinite(logits).all():
        return 1.0
    if (logits.argmax(1) == labels).all():
        return 1.0
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
    if not math.isfinite(t) or nll(logits, labels, t) > nll(logits, labels, 1.0):
        return 1.0
    return t


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
