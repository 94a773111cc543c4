"""Model selection on the validation split: ties broken by the validation loss, ``"last"``, and
an exponential moving average of the weights (timm's ``ModelEmaV3``)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from timm.utils import ModelEmaV3

import kdtoolkit
from kdtoolkit.builtin.losses import CELoss
from kdtoolkit.config.recipe import ModelConfig, RecipeError, load_recipe
from kdtoolkit.engine import selection, train
from kdtoolkit.engine.train import Stage, train_stage
from kdtoolkit.plugins.loss import CompositeLoss
from kdtoolkit.testing import TinyBackbone

ROLES = ("teacher", "student")


class Batches(list):
    """A list of batches with the two attributes ``train_stage`` reads of a loader."""

    @property
    def dataset(self):
        return range(sum(len(b["label"]) for b in self))


def batches():
    g = torch.Generator().manual_seed(0)
    return Batches(
        {"image": torch.randn(4, 1, 8, 8, generator=g), "label": torch.tensor([0, 1, 2, 0])}
        for _ in range(2)
    )


def selected_epoch(tmp_path, monkeypatch, select_by, scripted, ema=0.0):
    """Train 4 epochs with validation metrics ``scripted`` (one dict per epoch); return the
    epoch whose weights ``train_stage`` kept (matched against each epoch's weights)."""
    epochs = iter(scripted)
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: dict(next(epochs), f1=0.0))
    torch.manual_seed(0)
    model = TinyBackbone()
    config = ModelConfig(epochs=len(scripted), lr=0.1, select_by=select_by, ema=ema)
    stage = Stage("student", model, "image", CompositeLoss([("ce", 1.0, CELoss())]), config)
    seen = []

    def on_epoch(epoch, record):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})

    best = train_stage(
        stage, batches(), batches(), torch.device("cpu"), tmp_path / "last.pt", 3, on_epoch
    )
    matches = [i + 1 for i, s in enumerate(seen) if all(torch.equal(s[k], best[k]) for k in s)]
    return matches, best, seen


def test_tied_accuracy_keeps_the_epoch_with_the_lower_validation_loss(tmp_path, monkeypatch):
    scripted = [
        {"accuracy": 0.5, "loss": 1.0},
        {"accuracy": 0.7, "loss": 0.9},
        {"accuracy": 0.7, "loss": 0.6},  # tied accuracy, lower loss: kept
        {"accuracy": 0.7, "loss": 0.8},
    ]
    assert selected_epoch(tmp_path, monkeypatch, "accuracy", scripted)[0] == [3]


def test_a_higher_score_wins_whatever_its_loss(tmp_path, monkeypatch):
    scripted = [
        {"accuracy": 0.7, "loss": 0.2},
        {"accuracy": 0.8, "loss": 0.9},  # kept
        {"accuracy": 0.8, "loss": 0.95},
    ]
    assert selected_epoch(tmp_path, monkeypatch, "accuracy", scripted)[0] == [2]


def test_select_by_last_keeps_the_last_epoch(tmp_path, monkeypatch):
    scripted = [{"accuracy": 0.9, "loss": 0.1}, {"accuracy": 0.2, "loss": 3.0}]
    assert selected_epoch(tmp_path, monkeypatch, "last", scripted)[0] == [2]


def test_select_key_by_hand():
    val = {"accuracy": 0.5, "f1": 0.4, "loss": 0.7}
    assert selection.select("accuracy", val) == [0.5, -0.7]
    assert selection.select("f1", val) == [0.4, -0.7]
    assert selection.select("loss", val) == [-0.7, -0.7]


def test_ema_weights_are_timm_model_ema_v3_of_the_steps(tmp_path, monkeypatch):
    """The kept weights are those of ``ModelEmaV3(decay, use_warmup=True)`` updated after each
    optimiser step with the step count, computed here on a copy trained alike."""
    scripted = [{"accuracy": 0.5, "loss": 1.0}] * 3
    _, best, seen = selected_epoch(tmp_path, monkeypatch, "last", scripted, ema=0.9)
    torch.manual_seed(0)
    model = TinyBackbone()
    reference = ModelEmaV3(model, decay=0.9, use_warmup=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.05)
    config = ModelConfig(epochs=3, lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, train.lr_lambda(config, 2))
    for _ in range(3):
        for batch in batches():
            loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            reference.update(model, step=schedule.last_epoch)
    for key, value in reference.module.state_dict().items():
        torch.testing.assert_close(best[key], value)
        assert not torch.equal(value, model.state_dict()[key])  # the average, not the model
    assert 0 < reference.get_decay(6) < 0.9  # warmed up: the short run's decay is below 0.9


def test_ema_and_last_end_to_end(tmp_path, tiny_recipe):
    """A run with ``student.ema`` keeps averaged weights: the same run without it (same seeds,
    same batches) saves other student weights, and the same teacher."""
    sets = ["teacher.epochs=1", "student.epochs=2", "cv.only=[0]", "evaluate.baseline=false"]
    saved = {}
    for ema in (0.0, 0.5):
        recipe = load_recipe(tiny_recipe, [*sets, f"student.ema={ema}"])
        assert recipe.student.select_by == "last"  # the default
        kdtoolkit.run(recipe, quiet=True, force=True)
        fold = tmp_path / "run" / "fold_0"
        meta = json.loads((fold / "student" / "model.json").read_text())
        assert [h["epoch"] for h in meta["history"]] == [1, 2]
        saved[ema] = {role: load_file(fold / role / "model.safetensors") for role in ROLES}
    plain, averaged = saved[0.0], saved[0.5]
    assert all(torch.equal(plain["teacher"][k], averaged["teacher"][k]) for k in plain["teacher"])
    assert any(
        not torch.equal(plain["student"][k], averaged["student"][k]) for k in plain["student"]
    )
    with pytest.raises(RecipeError, match="ema"):
        load_recipe(tiny_recipe, ["student.ema=1.0"])


def test_a_resume_state_of_an_older_version_or_without_ema(tmp_path):
    """An older state's single best score resumes (its tie-break the lowest); a state made
    without the weight average is set aside when ``ema`` is on."""
    assert selection.best_score_of({"best_score": 0.75}) == [0.75, -math.inf]
    assert selection.best_score_of({"best_score": [0.5, -0.2]}) == [0.5, -0.2]
    model = TinyBackbone()
    loss = CompositeLoss([("ce", 1.0, CELoss())])
    stage = Stage("student", model, "image", loss, ModelConfig(ema=0.9))
    path = tmp_path / "last.pt"
    state = {
        "model": model.state_dict(),
        "loss": loss.state_dict(),
        "optimizer": {},
        "scheduler": {},
        "rng": torch.get_rng_state(),
        "epoch": 1,
        "best": {},
        "best_score": 0.5,
    }
    torch.save(state, path)
    logged = []
    assert train.resume_state(stage, path, model, loss, logged.append) is None
    assert "made without the weight average (ema)" in " ".join(logged)
