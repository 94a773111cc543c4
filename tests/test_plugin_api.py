"""The plugin API at its boundaries: plugin outputs checked where they enter the
engine, kinds and reserved option names checked at registration, ``Task.crop_aspect``,
``kd plugins --options`` and the ``kdtoolkit.testing`` helpers."""

from __future__ import annotations

import json
from typing import Annotated

import numpy as np
import pytest
import torch

from kdtoolkit import KdError, LossContext, LossTerm, Range, RoiProvider, RoiResult, Task, hookimpl
from kdtoolkit.config.recipe import RecipeError, load_recipe
from kdtoolkit.plugins.loss import CompositeLoss
from kdtoolkit.plugins.manager import options_of
from kdtoolkit.plugins.registry import PluginError
from kdtoolkit.plugins.roi import check_roi_result, run_provider
from kdtoolkit.testing import (
    fake_loss_context,
    fake_roi_request,
    fresh_registries,
    run_tiny_recipe,
    tiny_manifest,
    use_plugins,
)
from tests.conftest import kd

# ------------------------------------------------------------------ ROI provider results


def result_of(request, boxes=None, angles=None, found=None, metrics=None):
    n = len(request.predict)
    return RoiResult(
        boxes=np.tile([4.0, 4.0, 20.0, 12.0], (n, 1)) if boxes is None else boxes,
        angles=np.zeros(n) if angles is None else angles,
        found=np.ones(n, bool) if found is None else found,
        metrics={} if metrics is None else metrics,
    )


@pytest.fixture(scope="module")
def request6(tmp_path_factory):
    return fake_roi_request(tmp_path_factory.mktemp("roi"), n=6)


def problem_of(result, request):
    with pytest.raises(PluginError) as e:
        check_roi_result(result, request, "centre_box", "kd-demo 0.1")
    message = str(e.value)
    assert message.startswith("ROI provider 'centre_box' (plugin 'kd-demo 0.1'), fold 0: ")
    assert "\n" not in message
    return message


def test_a_good_result_comes_back_as_float_arrays(request6):
    out = check_roi_result(
        result_of(request6, boxes=np.tile([4, 4, 20, 12], (6, 1)), metrics={"map": np.float32(1)}),
        request6,
        "centre_box",
    )
    assert out.boxes.dtype == np.float64 and out.angles.dtype == np.float64
    assert out.found.dtype == bool and out.metrics == {"map": 1.0}


def test_one_box_too_few_names_the_provider(request6):
    message = problem_of(result_of(request6, boxes=np.zeros((5, 4)) + 4), request6)
    assert "boxes has shape (5, 4), expected (6, 4)" in message
    assert "request.predict" in message


def test_lists_instead_of_arrays_name_the_provider(request6):
    boxes = [[4.0, 4.0, 20.0, 12.0]] * 6
    assert "boxes must be a NumPy array of shape (6, 4), got list" in problem_of(
        result_of(request6, boxes=boxes), request6
    )
    found = [True] * 6
    assert "found must be a NumPy array" in problem_of(result_of(request6, found=found), request6)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"boxes": np.tile([4.0, 4.0, 20.0], (6, 1))}, "boxes has shape (6, 3)"),
        ({"angles": np.zeros((6, 1))}, "angles has shape (6, 1)"),
        ({"found": np.ones(6)}, "found has dtype float64, expected bool"),
        ({"boxes": np.full((6, 4), np.nan)}, "boxes is not finite at row 0"),
        ({"boxes": np.tile(["a", "b", "c", "d"], (6, 1))}, "dtype <U1, expected float"),
        ({"boxes": np.tile([20.0, 4.0, 4.0, 12.0], (6, 1))}, "is empty: expected x0 < x1"),
        ({"boxes": np.tile([4.0, 4.0, 40.0, 12.0], (6, 1))}, "outside its 32x32 image"),
        ({"angles": np.full(6, 90.0), "boxes": np.tile([0.0, 4, 32, 12], (6, 1))}, "at 90°"),
        ({"metrics": {"map": "high"}}, "metrics['map'] must be a finite number"),
        ({"metrics": {"latency_ms": 0.0}}, "latency_ms'] must be > 0"),
    ],
)
def test_wrong_results_are_one_line_problems(request6, change, expected):
    assert expected in problem_of(result_of(request6, **change), request6)


def test_not_a_roi_result(request6):
    message = problem_of({"boxes": np.zeros((6, 4))}, request6)
    assert "provide() must return a RoiResult, got dict" in message


def test_a_rotated_roi_inside_the_image_passes(request6):
    boxes = np.tile([12.0, 4.0, 20.0, 28.0], (6, 1))  # tall box, turned 90°: still inside
    check_roi_result(result_of(request6, boxes=boxes, angles=np.full(6, 90.0)), request6, "x")


class IndicesProvider(RoiProvider):
    def provide(self, request):
        return result_of(request, boxes=np.zeros((len(request.indices), 4)))


def test_a_misspelt_request_field_names_the_provider_and_the_fields(request6):
    with pytest.raises(PluginError) as e:
        run_provider(IndicesProvider(), request6, "indices_box", "kd-demo 0.1")
    message = str(e.value)
    assert message.startswith("ROI provider 'indices_box' (plugin 'kd-demo 0.1'), fold 0: ")
    assert "AttributeError" in message and "'indices'" in message
    assert "fold, samples, train, predict" in message
    assert isinstance(e.value.__cause__, AttributeError)


def test_a_provider_kderror_passes_unchanged(request6):
    class Refuses(RoiProvider):
        def provide(self, request):
            raise KdError("refuses: no boxes to learn from")

    with pytest.raises(KdError, match="^refuses: no boxes to learn from$"):
        run_provider(Refuses(), request6, "refuses")


def test_builtin_manual_provider_passes_the_check(request6):
    regs = fresh_registries(builtins=True)
    out = run_provider(regs.roi_providers["manual"](), request6, "manual")
    boxes = np.array([request6.samples[i].box for i in request6.predict], dtype=float)
    assert np.array_equal(out.boxes, boxes)


# ------------------------------------------------------------------ loss term outputs


class Returns(LossTerm):
    def __init__(self, value: object = 0.0):
        super().__init__()
        self.value = value

    def forward(self, ctx: LossContext) -> torch.Tensor:
        return self.value(ctx) if callable(self.value) else self.value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (lambda ctx: ctx.logits.sum(1), "forward() returned shape (2,), expected a scalar"),
        (lambda ctx: [ctx.logits.sum()], "forward() must return a scalar tensor, got list"),
        (lambda ctx: ctx.labels.sum(), "dtype torch.int64, expected a floating scalar"),
        (lambda ctx: ctx.logits.sum() * float("nan"), "forward() returned nan"),
        (lambda ctx: ctx.teacher, "AttributeError"),
    ],
)
def test_loss_outputs_are_checked_naming_the_term(value, expected):
    loss = CompositeLoss(
        [("ok", 1.0, Returns(lambda ctx: ctx.logits.sum())), ("bad", 0.5, Returns(value))],
        plugins=["kdtoolkit 0.1.0", "kd-demo 0.1"],
        where="fold 0 student",
    )
    with pytest.raises(PluginError) as e:
        loss(fake_loss_context())
    message = str(e.value)
    assert message.startswith("loss 'bad' (plugin 'kd-demo 0.1'), fold 0 student: ")
    assert expected in message and "\n" not in message


def test_a_misspelt_context_field_lists_the_fields():
    with pytest.raises(AttributeError, match="did you mean 'teacher_logits'"):
        fake_loss_context().teacher_logit  # noqa: B018


def test_from_registry_remembers_the_plugins():
    regs = fresh_registries(builtins=True)
    loss = CompositeLoss.from_registry(
        regs.losses, [("ce", 0.5, {}), ("kl", 0.5, {"temperature": 2.0})], where="fold 1 student"
    )
    assert loss.plugins[0].startswith("kdtoolkit ") and loss.where == "fold 1 student"
    total, parts = loss(fake_loss_context(with_teacher=True))
    assert total.ndim == 0 and set(parts) == {"ce", "kl"}


def test_plugin_error_at_adds_where():
    error = PluginError("loss", "x", "kd-demo 0.1", "forward() returned nan").at("fold 2 student")
    assert str(error) == "loss 'x' (plugin 'kd-demo 0.1'), fold 2 student: forward() returned nan"


# ------------------------------------------------------------------ kinds and reserved names


def registering(hook: str, name: str, obj: object):
    class One:
        pass

    def register(registry):
        registry.register(name, obj)

    setattr(One, hook, staticmethod(hookimpl(register)))
    One.__name__ = "kd_one"
    return One


class WeightedLoss(LossTerm):
    def __init__(self, weight: Annotated[float, Range(gt=0)] = 1.0):
        super().__init__()

    def forward(self, ctx):
        return ctx.logits.sum() * 0


class Provider(RoiProvider):
    def provide(self, request):  # pragma: no cover - never called
        raise NotImplementedError


@pytest.mark.parametrize(
    ("hook", "obj", "expected"),
    [
        ("kd_register_backbones", Returns, "expected a backbone factory, got class Returns"),
        ("kd_register_backbones", Provider, "expected a backbone factory"),
        ("kd_register_backbones", object, "cannot be called that way"),
        ("kd_register_backbones", Task("t", ("a",)), "expected a backbone factory"),
        ("kd_register_losses", object, "expected a subclass of kdtoolkit.LossTerm"),
        ("kd_register_losses", Returns(), "register the class Returns, not an instance"),
        ("kd_register_losses", WeightedLoss, "option 'weight' clashes with the recipe key"),
        ("kd_register_roi_providers", Returns, "expected a subclass of kdtoolkit.RoiProvider"),
        ("kd_register_tasks", Provider, "expected a kdtoolkit.Task instance"),
        ("kd_register_tasks", Task("t", ()), "at least one class"),
        ("kd_register_tasks", Task("t", ("a",), crop_aspect=0), "crop_aspect must be a positive"),
        ("kd_register_tasks", Task("t", ("a", "b"), ("only one",)), "1 descriptions for 2"),
    ],
)
def test_wrong_kinds_are_refused_at_registration(hook, obj, expected):
    with pytest.raises(KdError) as e:
        fresh_registries(registering(hook, "thing", obj))
    assert "from plugin 'kd_one'" in str(e.value) and expected in str(e.value)


def test_reserved_option_names_of_each_table():
    class MaskProvider(RoiProvider):
        def __init__(self, mask: str = "box"):
            pass

    def data(out_dir, name: str = "x"):  # pragma: no cover - never called
        return out_dir

    with pytest.raises(KdError, match="option 'mask' clashes with the recipe key 'mask' of its"):
        fresh_registries(registering("kd_register_roi_providers", "masky", MaskProvider))
    with pytest.raises(KdError, match=r"option 'name' clashes .* \[task\] table"):
        fresh_registries(registering("kd_register_tasks", "t", Task("t", ("a",), make_data=data)))


def test_every_builtin_and_installed_component_passes_the_kind_checks():
    regs = fresh_registries(builtins=True)
    assert {"ce", "kl"} <= set(regs.losses) and "manual" in regs.roi_providers
    assert callable(regs.backbones["resnet10t"])


# ------------------------------------------------------------------ Task.crop_aspect


def tall_task_plugin(aspect=0.5):
    class Tall:
        __name__ = "kd_tall"

        @hookimpl
        def kd_register_tasks(self, registry):
            registry.register("tall", Task("tall", ("a", "b", "c"), crop_aspect=aspect))

    return Tall()


def task_recipe(tmp_path, **data):
    return {
        "task": {"name": "tall"},
        "data": {"manifest": str(tiny_manifest(tmp_path / "d", n=3)), **data},
        "loss": [{"name": "ce"}],
    }


def test_crop_aspect_derives_the_crop_size(tmp_path):
    with use_plugins(tall_task_plugin(0.5), installed=False):
        recipe = load_recipe(task_recipe(tmp_path, image_size=[96, 64]))
        assert recipe.size("crop") == (96, 48)  # tall: height the image's longer side
        assert load_recipe(task_recipe(tmp_path)).size("crop") == (224, 112)
    with use_plugins(tall_task_plugin(2.0), installed=False):
        assert load_recipe(task_recipe(tmp_path)).size("crop") == (112, 224)


def test_a_crop_size_against_the_aspect_is_a_validation_error(tmp_path):
    with use_plugins(tall_task_plugin(0.5), installed=False):
        with pytest.raises(RecipeError) as e:
            load_recipe(task_recipe(tmp_path, crop_size=[112, 224]))
        (problem,) = e.value.problems
        assert problem.startswith("data.crop_size: [112, 224] is not the 0.5:1")
        assert "[112, 56]" in problem
        assert load_recipe(task_recipe(tmp_path, crop_size=[100, 51])).size("crop") == (100, 51)


def test_sos_recipes_agree_with_the_sos_crop_aspect():
    recipe = load_recipe("recipes/sos-quick.toml")
    w_over_h = recipe.size("crop")[1] / recipe.size("crop")[0]
    assert w_over_h == pytest.approx(2.0)


# ------------------------------------------------------------------ kd plugins --options


def test_options_of_come_from_the_declarations():
    (kl,) = options_of("kl")
    assert kl.kind == "loss" and kl.plugin.startswith("kdtoolkit ")
    (temperature,) = kl.options
    assert (temperature.name, temperature.type, temperature.bounds, temperature.default) == (
        "temperature",
        "float",
        ">= 0.05, <= 100",
        "3.0",
    )
    (sos,) = options_of("sos")
    size = next(o for o in sos.options if o.name == "size")
    assert size.bounds == ">= 64, <= 4096" and size.default == "256"
    backbone = {o.name: o for o in options_of("resnet10t")[0].options}
    assert "num_classes" not in backbone and backbone["drop_rate"].bounds == ">= 0, < 1"
    with pytest.raises(KdError, match="unknown component 'klx' \\(did you mean 'kl'\\?\\)"):
        options_of("klx")


def test_kd_plugins_options_prints_types_bounds_and_defaults():
    result = kd("plugins", "--options", "ce")
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if "label_smoothing" in x)
    assert "float" in line and ">= 0, < 1" in line and "0.0" in line
    unknown = kd("plugins", "--options", "atention_mse")
    assert unknown.returncode == 2 and "did you mean 'attention_mse'" in unknown.stderr


# ------------------------------------------------------------------ kdtoolkit.testing


def test_fake_loss_context_runs_every_builtin_term():
    ctx = fake_loss_context(batch=3, classes=4, size=32, with_teacher=True, class_weights=True)
    assert ctx.images.shape == (3, 1, 32, 32) and ctx.logits.shape == (3, 4)
    assert ctx.masks.shape == (3, 1, 32, 32) and ctx.boxes.shape == (3, 4)
    assert ctx.teacher_logits.shape == (3, 4) and ctx.class_weights.shape == (4,)
    regs = fresh_registries(builtins=True)
    for name in ("ce", "kl", "attention_mse", "attention_kl", "roi_feature", "roi_ce"):
        term = regs.losses[name]()
        term.setup(ctx.features.shape[1], ctx.teacher_features.shape[1])
        value = CompositeLoss([(name, 1.0, term)])(ctx)[0]
        value.backward(retain_graph=True)
    assert ctx.student.stem.weight.grad is not None
    bare = fake_loss_context(with_rois=False)
    assert bare.boxes is None and bare.masks is None and bare.teacher_logits is None


def test_fake_roi_request_holds_a_tiny_manifest(tmp_path):
    request = fake_roi_request(tmp_path, n=9, size=40, fold=2, train=[0, 3])
    assert request.fold == 2 and list(request.train) == [0, 3] and len(request.predict) == 9
    assert request.train.dtype == np.int64 and request.workdir.is_dir()
    sample = request.samples[4]
    assert sample.image.exists() and (sample.width, sample.height) == (40, 40)
    request.log("hello")
    assert request.lines == ["hello"]


class CentreProvider(RoiProvider):
    """A provider written from the docs: the central half of every image."""

    learned = True

    def provide(self, request):
        rows = [request.samples[i] for i in request.predict]
        sizes = np.array([[s.width, s.height, s.width, s.height] for s in rows], dtype=float)
        return RoiResult(
            boxes=np.array([0.25, 0.25, 0.75, 0.75]) * sizes,
            angles=np.zeros(len(rows)),
            found=np.ones(len(rows), dtype=bool),
            metrics={"latency_ms": 0.5},
        )


class ShortProvider(CentreProvider):
    def provide(self, request):
        result = super().provide(request)
        return RoiResult(result.boxes[1:], result.angles[1:], result.found[1:])


class RoiPlugin:
    __name__ = "kd_centre"

    @hookimpl
    def kd_register_roi_providers(self, registry):
        registry.register("centre_box", CentreProvider)
        registry.register("short_box", ShortProvider)


def test_run_tiny_recipe_with_a_plugin_provider(tmp_path):
    result = run_tiny_recipe(tmp_path, RoiPlugin(), roi={"provider": "centre_box"})
    assert (result.output / "results.json").exists() and result.results["folds_run"] == [0]
    assert "two_stage" in result.results["summary"]  # a learned provider's held-out boxes
    assert result.results["latency_ms"]["two_stage_detector"] == pytest.approx(0.5)


def test_a_short_provider_result_stops_the_run_naming_it(tmp_path):
    with pytest.raises(PluginError, match=r"ROI provider 'short_box' \(plugin 'kd_centre'\)"):
        run_tiny_recipe(tmp_path, RoiPlugin(), roi={"provider": "short_box"})


def _knee_data(out_dir, n: int = 12):
    """A task's data source: its own classes in its own manifest, cached per option set."""
    from kdtoolkit.testing import tiny_manifest

    return tiny_manifest(out_dir / f"n{n}", n=n, classes=("kl0", "kl1", "kl2"))


class KneePlugin:
    __name__ = "kd_knee"

    @hookimpl
    def kd_register_tasks(self, registry):
        from kdtoolkit import Task

        defaults = {"loss": [{"name": "ce", "weight": 1.0}]}
        registry.register(
            "knee", Task("knee", ("kl0", "kl1", "kl2"), defaults=defaults, make_data=_knee_data)
        )


def test_run_tiny_recipe_runs_the_given_tasks_own_data(tmp_path):
    result = run_tiny_recipe(tmp_path, KneePlugin(), task={"name": "knee", "n": 14})
    assert result.results["classes"] == ["kl0", "kl1", "kl2"]
    assert (tmp_path / ".kdcache" / "knee" / "n14" / "manifest.csv").exists()
    assert not (tmp_path / "data").exists()  # not the helper's own tiny data
    recipe = json.loads((result.output / "recipe.resolved.json").read_text())
    assert [t["name"] for t in recipe["recipe"]["loss"]] == ["ce"]  # the task's default terms


def test_run_tiny_recipe_takes_an_installed_plugin_too(tmp_path):
    import kd_sos.plugin

    result = run_tiny_recipe(
        tmp_path, kd_sos.plugin, task={"name": "sos", "n": 20, "size": 64}, **{"cv.folds": 2}
    )
    assert len(result.results["classes"]) == 5  # the SOS stages, from its own phantom
