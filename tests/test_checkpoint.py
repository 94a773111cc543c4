"""Checkpoints in one process: the safetensors round trip, its metadata header, resume state,
model rebuilding and every refusal, each checked by hand (docs/testing.md: mutation testing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from torch import nn

from kdtoolkit.errors import KdError
from kdtoolkit.models.backbone import build_backbone
from kdtoolkit.models.checkpoint import (
    META_KEY,
    load_checkpoint,
    load_model,
    load_state,
    mismatch,
    model_from_weights,
    read_metadata,
    save_checkpoint,
    save_state,
    split_weights,
    weights_of,
)

FIX = "give a model.safetensors written by kd run"
META = {"backbone": "resnet10t", "classes": ["a", "b", "c"], "channels": 1}


def test_weights_and_metadata_round_trip(tmp_path: Path) -> None:
    """Tensors (non-contiguous, on autograd, integer) come back equal and detached; the
    metadata is in the header (sorted JSON) and in the readable .json beside it."""
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"w": base.t(), "g": torch.ones(2, requires_grad=True), "n": torch.tensor([3, 4])}
    meta = {"z": 1, "a": [1, 2], "path": Path("x/y")}
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, tensors, meta)
    got, got_meta = load_checkpoint(path)
    assert set(got) == {"w", "g", "n"}
    assert torch.equal(got["w"], base.t()) and torch.equal(got["n"], torch.tensor([3, 4]))
    assert not got["g"].requires_grad
    assert got_meta == read_metadata(path) == {"z": 1, "a": [1, 2], "path": "x/y"}
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert header["__metadata__"][META_KEY] == json.dumps(meta, sort_keys=True, default=str)
    assert path.with_suffix(".json").read_text() == json.dumps(meta, indent=2, default=str)


def test_non_finite_weights_are_not_written(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, {"ok": torch.zeros(1)}, {"v": 1})
    before = path.read_bytes()
    bad = {"a": torch.tensor([1.0, float("nan")]), "b": torch.tensor([float("inf")])}
    with pytest.raises(KdError) as e:
        save_checkpoint(path, {**bad, "i": torch.tensor([1])}, {"v": 2})
    assert str(e.value) == f"{path}: not written, weights a, b are not finite"
    assert path.read_bytes() == before and read_metadata(path) == {"v": 1}


def header_file(path: Path, header: bytes, body: bytes = b"") -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + body)
    return path


def test_damaged_checkpoints_are_one_line_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "none.safetensors"
    with pytest.raises(KdError, match=f"^{missing}: checkpoint not found$"):
        load_checkpoint(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(KdError) as e:
        load_checkpoint(garbage)
    assert str(e.value).startswith(f"{garbage}: checkpoint is unreadable (")
    assert str(e.value).endswith(f"); {FIX}")
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(save({"w": torch.zeros(2)}, metadata={"other": "1"}))
    listed = tmp_path / "listed.safetensors"
    listed.write_bytes(save({"w": torch.zeros(2)}, metadata={META_KEY: "[1, 2]"}))
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, {"w": torch.zeros(4)}, {"v": 1})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1])
    cases = {
        plain: "a safetensors file without kdtoolkit metadata",
        listed: "its kdtoolkit metadata is not a JSON object",
        cut: "truncated: shorter than its header says",
        header_file(tmp_path / "zero.safetensors", b""): "bad header size",
    }
    for path, why in cases.items():
        with pytest.raises(KdError) as e:
            read_metadata(path)
        assert str(e.value).startswith(f"{path}: checkpoint is unreadable ("), path
        assert why in str(e.value) and str(e.value).endswith(f"); {FIX}"), str(e.value)
    empty = header_file(tmp_path / "empty.safetensors", json.dumps({}).encode())
    with pytest.raises(KdError, match="without kdtoolkit metadata"):
        read_metadata(empty)  # no tensors: nothing to be short of


def test_resume_state_round_trip(tmp_path: Path) -> None:
    state = {"epoch": 3, "rng": torch.tensor([1, 2, 3]), "opt": {"lr": 0.1}}
    save_state(tmp_path / "last.pt", state)
    got = load_state(tmp_path / "last.pt")
    assert got["epoch"] == 3 and got["opt"] == {"lr": 0.1}
    assert torch.equal(got["rng"], state["rng"])


def test_loss_weights_travel_under_a_prefix() -> None:
    model, loss = nn.Linear(2, 3), nn.Module()
    loss.proj = nn.Linear(3, 1)
    weights = weights_of(model, loss)
    assert sorted(weights) == ["bias", "loss.proj.bias", "loss.proj.weight", "weight"]
    assert weights["weight"] is not model.weight and not weights["weight"].requires_grad
    model_part, loss_part = split_weights(weights)
    assert sorted(model_part) == ["bias", "weight"]
    assert sorted(loss_part) == ["proj.bias", "proj.weight"]
    assert torch.equal(loss_part["proj.weight"], loss.proj.weight)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone("resnet10t", 3, 1, {})


def test_model_is_rebuilt_from_its_metadata(tmp_path: Path) -> None:
    model = tiny_model()
    path = tmp_path / "model.safetensors"
    meta = {**META, "backbone_options": {"pretrained": True}}  # never fetched again
    save_checkpoint(path, weights_of(model, nn.Module()), meta)
    rebuilt, got_meta = load_model(path)
    assert got_meta == meta and not rebuilt.training
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(rebuilt(x), model.eval()(x))


def test_weights_that_do_not_fit_are_named(tmp_path: Path) -> None:
    weights = weights_of(tiny_model(), nn.Module())
    meta = {**META, "backbone_options": {}}
    first = next(iter(weights))
    fix = "; use the model.json written with it"
    with pytest.raises(KdError) as e:
        model_from_weights({k: v for k, v in weights.items() if k != first}, meta, "ck")
    assert str(e.value) == (
        f"ck: its weights do not fit backbone 'resnet10t' of its metadata (1 missing, 0 "
        f"unexpected, e.g. {first}){fix}"
    )
    with pytest.raises(KdError) as e:
        model_from_weights({**weights, "extra.w": torch.zeros(1)}, meta, "ck")
    assert "(0 missing, 1 unexpected, e.g. extra.w)" in str(e.value)
    with pytest.raises(KdError) as e:
        model_from_weights(weights, {**meta, "classes": ["a", "b"]}, "ck")
    assert str(e.value).startswith(
        "ck: its weights do not fit backbone 'resnet10t' of its metadata (RuntimeError: "
        "size mismatch for "
    ) and str(e.value).endswith(fix)
    nan = {k: v.clone() for k, v in weights.items()}
    nan[first].view(-1)[0] = float("nan")
    with pytest.raises(KdError) as e:
        model_from_weights(nan, meta, "ck")
    assert str(e.value) == f"ck: weights {first} are not finite; retrain it"
    with pytest.raises(KdError) as e:
        model_from_weights(weights, {k: v for k, v in meta.items() if k != "channels"}, "ck")
    assert str(e.value).startswith("ck: checkpoint's metadata is unreadable (")


def test_mismatch_keeps_the_size_line_or_the_first() -> None:
    text = "Error(s) in loading:\n\tMissing key(s)\n\tsize mismatch for fc.weight: copying\n"
    assert mismatch(RuntimeError(text)) == "RuntimeError: size mismatch for fc.weight: copying"
    assert mismatch(KeyError("classes")) == "KeyError: 'classes'"
    assert mismatch(TypeError("")) == "TypeError: "
    assert mismatch(RuntimeError("x" * 300)) == "RuntimeError: " + "x" * 200
