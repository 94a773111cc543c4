"""Calibration of a row's held-out probabilities: the expected calibration error (top-label,
15 equal-width confidence bins, L1, as torchmetrics' ``CalibrationError``), the reliability
curve it is read from, and each row's figures before and after temperature scaling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Equal-width confidence bins of the ECE and the reliability diagram.
N_BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (float64)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Reliability:
    """Per confidence bin: mean confidence, accuracy and share of the samples (empty bins 0).
    Bin ``i`` holds confidences in ``[i/n, (i+1)/n)``; a confidence of exactly 1 has a bin of
    its own (as in torchmetrics)."""

    confidence: np.ndarray
    accuracy: np.ndarray
    share: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error: ``sum(share * |accuracy - confidence|)``."""
        return float(np.sum(self.share * np.abs(self.accuracy - self.confidence)))


def reliability(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> Reliability:
    """The top-label reliability curve of N×K ``probabilities`` against ``labels``."""
    p = np.asarray(probabilities, dtype=np.float64)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges, confidence, side="right") - 1
    count = np.bincount(bins, minlength=n_bins + 1).astype(np.float64)
    safe = np.maximum(count, 1)
    conf = np.bincount(bins, confidence, minlength=n_bins + 1) / safe
    acc = np.bincount(bins, correct, minlength=n_bins + 1) / safe
    return Reliability(conf, acc, count / max(1.0, count.sum()))


def ece(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-label expected calibration error (L1, ``n_bins`` equal-width bins)."""
    if len(labels) == 0:
        return float("nan")
    return reliability(probabilities, labels, n_bins).ece


def row_calibration(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, float]:
    """``{"ece", "ece_calibrated", "nll", "nll_calibrated", "temperature"}`` of one row."""
    labels = np.asarray(labels)
    out: dict[str, float] = {"temperature": float(temperature)}
    for suffix, t in (("", 1.0), ("_calibrated", temperature)):
        p = softmax(logits, t)
        out[f"ece{suffix}"] = ece(p, labels)
        picked = p[np.arange(len(labels)), labels] if len(labels) else np.ones(1)
        out[f"nll{suffix}"] = float(-np.mean(np.log(np.maximum(picked, 1e-300))))
    return out


def pooled_calibration(folds: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per row, the ECE before and after temperature scaling of the folds' held-out logits
    pooled (each fold's logits divided by its own temperature), and each fold's temperature.
    ``folds``: the folds' ``predictions`` (``label``, ``logits`` and ``temperature``, each
    ``{row: ...}``); rows without logits are left out."""
    rows: dict[str, list[tuple[int, np.ndarray, np.ndarray, float]]] = {}
    for k, pred in enumerate(folds):
        logits, temps = pred.get("logits") or {}, pred.get("temperature") or {}
        labels = np.asarray(pred.get("label") or [], dtype=np.int64)
        for row, z in logits.items():
            z = np.asarray(z, dtype=np.float64)
            if z.ndim == 2 and len(z) == len(labels) and len(z):
                rows.setdefault(row, []).append((k, z, labels, float(temps.get(row, 1.0))))
    out: dict[str, dict[str, Any]] = {}
    for row, parts in rows.items():
        labels = np.concatenate([p[2] for p in parts])
        before = np.concatenate([softmax(p[1]) for p in parts])
        after = np.concatenate([softmax(p[1], p[3]) for p in parts])
        out[row] = {
            "ece": ece(before, labels),
            "ece_calibrated": ece(after, labels),
            "n": len(labels),
            "temperatures": [p[3] for p in parts],
        }
    return out


def pooled_reliability(
    folds: Sequence[Mapping[str, Any]], row: str
) -> tuple[Reliability, Reliability] | None:
    """(before, after) reliability curves of ``row`` over the folds' pooled logits."""
    parts = []
    for pred in folds:
        z = (pred.get("logits") or {}).get(row)
        if z is not None and len(z):
            t = float((pred.get("temperature") or {}).get(row, 1.0))
            parts.append((np.asarray(z, dtype=np.float64), np.asarray(pred["label"]), t))
    if not parts:
        return None
    labels = np.concatenate([p[1] for p in parts])
    before = np.concatenate([softmax(p[0]) for p in parts])
    after = np.concatenate([softmax(p[0], p[2]) for p in parts])
    return reliability(before, labels), reliability(after, labels)
