"""``teacher.pretrained`` / ``student.pretrained``: checked at validation, never the network."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from safetensors.torch import save_file

from kdtoolkit.builtin.timm import timm_backbone
from kdtoolkit.config import pretrained as pretrained_mod
from kdtoolkit.config.pretrained import timm_hub_problem, weights_file_problem
from kdtoolkit.config.recipe import RecipeError, load_recipe
from kdtoolkit.errors import KdError
from kdtoolkit.models.backbone import build_backbone
from kdtoolkit.models.timm import create_timm_model
from tests.conftest import kd


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1, empty hub and torch-hub caches, and every inet socket refused."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def refuse(*args, **kwargs):
        raise AssertionError("network touched in a test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _resnet_file(tmp_path, suffix=".safetensors"):
    torch.manual_seed(123)
    model = timm_backbone("resnet10t", 3, 1)
    state = _state(model.model)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path, state


# --------------------------------------------------------------------------- files


def test_weights_files_are_checked_without_unpickling(tmp_path):
    path, _ = _resnet_file(tmp_path)
    assert weights_file_problem(path) is None
    torch_path, _ = _resnet_file(tmp_path, ".pt")
    assert weights_file_problem(torch_path) is None
    assert "no such file" in weights_file_problem(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a header")
    assert "not a safetensors file" in weights_file_problem(junk)
    pickled = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole module: needs unpickling
    problem = weights_file_problem(pickled)
    assert "never unpickled" in problem and "\n" not in problem
    nested = tmp_path / "nested.pt"
    torch.save({"a": {"b": torch.zeros(1)}}, nested)
    assert "not a state dict of tensors" in weights_file_problem(nested)


def test_local_file_validates_and_the_teacher_starts_from_it(tmp_path, tiny_recipe):
    path, state = _resnet_file(tmp_path)
    recipe = load_recipe(tiny_recipe, [f'teacher.pretrained="{path}"'])
    assert recipe.teacher.pretrained == str(path)
    assert recipe.teacher.backbone_options["pretrained"] == str(path)
    assert (
        recipe.student.pretrained is False and "pretrained" not in recipe.student.backbone_options
    )
    # how the engine builds a stage's model: the backbone options carry the file
    config = recipe.teacher
    model = build_backbone(config.backbone, 3, 1, dict(config.backbone_options))
    key = "conv1.0.weight"
    torch.testing.assert_close(model.model.state_dict()[key], state[key])
    torch.manual_seed(0)
    fresh = build_backbone(config.backbone, 3, 1, {})
    assert not torch.equal(fresh.model.state_dict()[key], state[key])


def test_both_spellings_agree_and_the_digest_keeps_unset_runs(tmp_path, tiny_recipe):
    path, _ = _resnet_file(tmp_path)
    plain = load_recipe(tiny_recipe)
    a = load_recipe(tiny_recipe, [f'teacher.pretrained="{path}"'])
    b = load_recipe(tiny_recipe, [f'teacher.backbone_options.pretrained="{path}"'])
    assert b.teacher.pretrained == str(path)
    assert a.digest() == b.digest() != plain.digest()
    raw = plain.to_dict()
    raw["teacher"].pop("pretrained")
    assert load_recipe(raw).digest() == plain.digest()  # false is the same as unset
    with pytest.raises(RecipeError, match="keep one of the two"):
        load_recipe(
            tiny_recipe,
            [f'teacher.pretrained="{path}"', 'teacher.backbone_options.pretrained="other.pt"'],
        )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("true", "true is ambiguous"),
        ('"missing.safetensors"', "no such file"),
        ('""', "empty"),
    ],
)
def test_bad_values_are_one_line_problems(tiny_recipe, value, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(tiny_recipe, [f"student.pretrained={value}"])
    (problem,) = info.value.problems
    assert problem.startswith("student.pretrained: ") and message in problem


def test_a_backbone_without_pretrained_option_refuses_it(tmp_path, tiny_recipe):
    path, _ = _resnet_file(tmp_path)
    with pytest.raises(RecipeError, match="takes no pretrained weights"):
        load_recipe(
            tiny_recipe,
            ['student.backbone="roi_zoom"', f'student.pretrained="{path}"'],
        )


# --------------------------------------------------------------------------- hub tag


def test_timm_tag_offline_without_cache_is_a_one_line_error(tiny_recipe):
    with pytest.raises(RecipeError) as info:
        load_recipe(tiny_recipe, ['teacher.pretrained="timm"'])
    (problem,) = info.value.problems
    assert problem == (
        "teacher.pretrained: timm's pretrained weights of 'resnet10t' are not in the local hub "
        "cache and HF_HUB_OFFLINE is set; download the weights elsewhere and pass a local file: "
        'teacher.pretrained = "path/to/weights.safetensors"'
    )
    with pytest.raises(KdError, match="^pretrained: timm's pretrained weights"):
        create_timm_model("resnet10t", 3, 1, pretrained="timm")


def test_timm_tag_uses_the_variant_of_a_timm_based_backbone(tiny_recipe):
    with pytest.raises(RecipeError, match="weights of 'convnext_atto'"):
        load_recipe(
            tiny_recipe,
            [
                'student.backbone="convnext_attn"',
                'student.backbone_options.variant="convnext_atto"',
                'student.pretrained="timm"',
            ],
        )


def _fake_hub_cache(root, repo, filename):
    """The huggingface_hub cache layout of one cached file."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    snapshot = folder / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_bytes(b"")


def test_timm_tag_is_accepted_when_cached_offline(tmp_path, tiny_recipe):
    import timm.models

    repo = timm.models.get_pretrained_cfg("resnet10t").hf_hub_id
    _fake_hub_cache(tmp_path / "hub", repo, "model.safetensors")
    assert timm_hub_problem("resnet10t", "teacher") is None
    recipe = load_recipe(tiny_recipe, ['teacher.pretrained="timm"'])
    assert recipe.teacher.backbone_options["pretrained"] == "timm"


def test_timm_tag_online_but_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(pretrained_mod, "hub_offline", lambda: False)
    monkeypatch.setattr(pretrained_mod, "_reachable", lambda url, timeout=3.0: False)
    problem = timm_hub_problem("resnet10t", "student")
    assert "not in the local hub cache and the hub is not reachable" in problem
    assert problem.endswith('student.pretrained = "path/to/weights.safetensors"')


def test_kd_validate_offline_exits_2_with_one_problem_line(tiny_recipe, tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "TORCH_HOME": str(tmp_path / "torch"),
    }
    env.pop("KD_DEBUG", None)
    out = kd("validate", str(tiny_recipe), "--set", 'teacher.pretrained="timm"', env=env)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if "pretrained" in line]
    assert len(lines) == 1 and "teacher.pretrained: timm's pretrained weights" in lines[0]
    assert 'pass a local file: teacher.pretrained = "path/to/weights.safetensors"' in lines[0]
