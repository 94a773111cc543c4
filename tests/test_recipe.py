"""Recipe validation: every error class, all problems at once, overrides, JSON round trip."""

import json

import pytest

from kdtoolkit.config.override import parse_override
from kdtoolkit.config.recipe import RecipeError, load_recipe
from kdtoolkit.errors import KdError
from tests.conftest import kd

BASE = """
[experiment]
name = "t"
output = "{out}"
seed = 1

[data]
manifest = "data/manifest.csv"
classes = ["a", "b"]
image_size = 64
crop_size = [32, 64]

[cv]
folds = 3

[teacher]
backbone = "resnet18"
epochs = 2

[student]
backbone = "convnext_attn"
backbone_options = {{ drop_path_rate = 0.1 }}

[roi]
provider = "manual"

[[loss]]
name = "ce"
weight = 0.2

[[loss]]
name = "kl"
weight = 0.8
temperature = 3.0
"""


def write(tmp_path, text, name="r.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(tmp_path, text, overrides=()):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text), list(overrides))
    return e.value.problems


def test_valid_recipe_loads_typed(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE.format(out=tmp_path / "run")))
    assert recipe.cv.folds == 3
    assert recipe.teacher.epochs == 2
    assert recipe.size("crop") == (32, 64) and recipe.size("image") == (64, 64)
    assert [(lc.name, lc.weight) for lc in recipe.loss] == [("ce", 0.2), ("kl", 0.8)]
    assert recipe.loss[1].options == {"temperature": 3.0}
    assert recipe.data.manifest == str(tmp_path / "data" / "manifest.csv")
    raw = json.loads(recipe.to_json())
    assert raw["loss"][1] == {"name": "kl", "weight": 0.8, "temperature": 3.0}
    assert raw["student"]["backbone_options"] == {"drop_path_rate": 0.1}


def test_every_error_class_reported_together(tmp_path):
    text = BASE.format(out="o").replace("folds = 3", "folds = 1\nfoldz = 2")
    text = text.replace('backbone = "resnet18"', 'backbone = "resnet_18"')
    text = text.replace("epochs = 2", 'epochs = "two"')
    text = text.replace('name = "kl"', 'name = "kll"')
    text = text.replace("drop_path_rate = 0.1", "drop_pth_rate = 0.1")
    text = text.replace('provider = "manual"', 'provider = "manul"')
    problems = problems_of(tmp_path, text)
    joined = "\n".join(problems)
    assert "cv.foldz: unknown key (did you mean 'folds'?)" in joined
    assert "cv.folds: must be >= 2, got 1" in joined
    assert "teacher.epochs: expected an integer, got str 'two'" in joined
    assert "teacher.backbone: unknown backbone 'resnet_18'" in joined and "resnet18" in joined
    assert "loss[1].name: unknown loss 'kll'" in joined and "'kl'" in joined
    assert "student.backbone_options.drop_pth_rate: unknown option" in joined
    assert "'drop_path_rate'" in joined
    assert "roi.provider: unknown ROI provider 'manul'" in joined and "kd plugins" in joined
    assert len(problems) == 7


def test_component_option_types_and_ranges(tmp_path):
    text = BASE.format(out="o").replace("temperature = 3.0", "temperature = -1.0\nbeta = 2")
    joined = "\n".join(problems_of(tmp_path, text))
    assert "loss[1].temperature: must be >= 0.05" in joined
    assert "loss[1].beta: unknown option" in joined


def test_union_options_name_the_range_of_the_fitting_alternative():
    from typing import Annotated, Literal

    from kdtoolkit.config.option import Range, check_value

    size = Annotated[int, Range(ge=8)] | list[Annotated[int, Range(ge=8)]]
    assert check_value(4, size) == "must be >= 8, got 4"
    assert check_value([16, 4], size) == "must be >= 8, got 4"
    assert check_value("x", size) == "expected int | list[int], got str 'x'"
    # a Literal alternative's "must be one of" is not a range: the types are named
    assert check_value(2.5, int | Literal["mid"]) == "expected int | 'mid', got float 2.5"
    assert check_value(16, size) is None and check_value([8, 9], size) is None


def test_unknown_section_and_missing_loss(tmp_path):
    text = BASE.format(out="o").split("[[loss]]")[0] + "\n[studnet]\nepochs = 3\n"
    joined = "\n".join(problems_of(tmp_path, text))
    assert "studnet: unknown section (did you mean 'student'" in joined
    assert "loss: at least one [[loss]]" in joined


def test_overrides_are_toml_values_and_validated(tmp_path):
    path = write(tmp_path, BASE.format(out="o"))
    recipe = load_recipe(
        path,
        [
            "cv.folds=4",
            "data.channels=3",
            "loss.1.temperature=2",
            "experiment.name=bare_word",
            "data.classes=['x', 'y']",
        ],
    )
    assert recipe.cv.folds == 4 and recipe.data.channels == 3
    assert recipe.loss[1].options["temperature"] == 2
    assert recipe.experiment.name == "bare_word"
    assert recipe.data.classes == ["x", "y"]
    with pytest.raises(RecipeError, match="cv.folds: expected an integer"):
        load_recipe(path, ["cv.folds=many"])


def test_python_values_override_like_set_strings(tmp_path):
    path = write(tmp_path, BASE.format(out="o"))
    by_strings = load_recipe(path, ["cv.folds=4", "loss.1.temperature=2", "teacher.lr=0.5"])
    by_values = load_recipe(path, cv={"folds": 4}, teacher={"lr": 0.5}, **{"loss.1.temperature": 2})
    assert by_values.to_dict() == by_strings.to_dict()
    mixed = load_recipe(path, ["cv.folds=2"], data={"classes": ["x", "y"]})
    assert mixed.cv.folds == 2 and mixed.data.classes == ["x", "y"]
    with pytest.raises(RecipeError, match="cv.folds: expected an integer"):
        load_recipe(path, cv={"folds": "many"})
    with pytest.raises(KdError, match="a list of strings"):
        load_recipe(path, "cv.folds=2")


def test_a_folder_given_as_recipe_is_a_one_line_error(tmp_path):
    result = kd("validate", str(tmp_path))
    assert result.returncode == 2 and "is a folder" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_bad_override_syntax(bad):
    with pytest.raises(KdError):
        parse_override(bad)


def test_recipe_is_data_not_code(tmp_path):
    """Code in any string of a recipe, or of a --set value, is kept as text and never run:
    the payload would create a file."""
    marker = tmp_path / "ran"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    text = BASE.format(out="o").replace('name = "t"', f"name = {json.dumps(payload)}")
    path = write(tmp_path, text)
    recipe = load_recipe(path, [f"experiment.output={json.dumps(payload)}"])
    assert recipe.experiment.name == recipe.experiment.output == payload
    with pytest.raises(RecipeError):
        load_recipe(path, [f"loss.0.weight={json.dumps(payload)}", f"task.name={payload}"])
    result = kd("validate", str(path), "--set", f"student.lr={payload}", "--show")
    assert result.returncode == 2 and "student.lr" in result.stderr
    assert not marker.exists()


SOS = """
[task]
name = "sos"
n = 40
[data]
image_size = 64
"""


def test_task_defaults_apply_under_the_recipe(tmp_path):
    """The task's default terms with their weights and options, and its other defaults; the
    recipe's own keys win."""
    text = SOS + "[cv]\nfolds = 3\n"
    recipe = load_recipe(write(tmp_path, text))
    terms = [(lc.name, lc.weight, lc.options) for lc in recipe.loss]
    assert terms == [
        ("ce", 0.2, {}),
        ("kl", 0.8, {"temperature": 3.0}),
        ("attention_mse", 0.01, {}),
    ]
    assert recipe.teacher.backbone == recipe.student.backbone == "convnext_attn"
    assert (recipe.cv.folds, recipe.data.channels) == (3, 1)  # recipe over task default 5
    assert recipe.task.options == {"n": 40}


def test_set_appends_a_loss_term_as_in_kd_compare(tmp_path):
    """``loss.N.…`` with N the number of terms appends one, for ``kd run``/``kd validate``
    as for ``kd compare`` variants, also on the task's default terms."""
    text = SOS
    path = write(tmp_path, text)
    recipe = load_recipe(path, ["loss.3.name=roi_ce", "loss.3.weight=0.5", "loss.1.weight=0.4"])
    assert [(lc.name, lc.weight) for lc in recipe.loss] == [
        ("ce", 0.2),
        ("kl", 0.4),
        ("attention_mse", 0.01),
        ("roi_ce", 0.5),
    ]
    assert recipe.loss[1].options == {"temperature": 3.0}
    one = write(tmp_path, text + '[[loss]]\nname = "ce"\n', "one.toml")
    assert [lc.name for lc in load_recipe(one, ["loss.1.name=kl"]).loss] == ["ce", "kl"]
    with pytest.raises(KdError, match=r"loss\.5 is not an index of a list of 1"):
        load_recipe(one, ["loss.5.name=kl"])
    result = kd("validate", str(one), "--set", "loss.1.name=kl")
    assert result.returncode == 0, result.stderr


def test_digest_ignores_output_and_device(tmp_path):
    path = write(tmp_path, BASE.format(out="o"))
    a = load_recipe(path)
    b = load_recipe(path, ["experiment.output=elsewhere", "experiment.device=cpu", "cv.only=[1]"])
    c = load_recipe(path, ["teacher.epochs=3"])
    assert a.digest() == b.digest() != c.digest()


def test_cli_validate_reports_all_errors_exit_2(tmp_path):
    text = (
        BASE.format(out="o")
        .replace("folds = 3", "folds = 0")
        .replace('name = "kl"', 'name = "kll"')
    )
    result = kd("validate", str(write(tmp_path, text)))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "cv.folds: must be >= 2" in result.stderr
    assert "loss[1].name: unknown loss 'kll'" in result.stderr
    assert "2 problem(s)" in result.stderr


def test_cli_validate_ok_and_show(tmp_path):
    path = write(tmp_path, BASE.format(out="o"))
    result = kd("validate", str(path), "--set", "cv.folds=4", "--show")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cv"]["folds"] == 4


def test_cli_missing_recipe_and_bad_toml(tmp_path):
    result = kd("validate", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "recipe not found" in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[cv\nfolds=")
    result = kd("validate", str(bad))
    assert result.returncode == 2 and "not valid TOML" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_version():
    from importlib.metadata import version

    import kdtoolkit

    result = kd("--version")
    assert result.returncode == 0
    assert result.stdout.split() == ["kdtoolkit", version("kdtoolkit")]
    assert kdtoolkit.__version__ == version("kdtoolkit")


def test_compare_variants_live_in_the_recipe_out_of_its_digest(tmp_path):
    """``[compare]`` lists ``kd compare``'s default variants (names and --set overrides,
    validated with their key paths); it does not change what a run computes."""
    from kdtoolkit.engine.compare import Variant, variants_of

    text = BASE.format(out="o")
    plain = write(tmp_path, text)
    listed = write(
        tmp_path,
        text + '[compare]\nvariants.strong = ["loss.0.weight=1.0"]\nvariants.same = []\n',
        "listed.toml",
    )
    recipe = load_recipe(listed)
    assert recipe.compare.variants == {"strong": ["loss.0.weight=1.0"], "same": []}
    assert recipe.digest() == load_recipe(plain).digest()
    assert variants_of(listed, [], []) == [
        Variant("strong", ["loss.0.weight=1.0"]),
        Variant("same", []),
    ]
    assert variants_of(plain, [], []) == [Variant("recipe", [])]
    assert variants_of(listed, ["kl:loss.1.weight=0"], []) == [Variant("kl", ["loss.1.weight=0"])]
    bad = ['compare.variants.Bad=["loss.0.weight=1"]', 'compare.variants.ok=["no_equals"]']
    with pytest.raises(RecipeError) as e:
        load_recipe(plain, bad)
    assert "compare.variants.Bad: a variant name is lower snake_case" in str(e.value)
    assert "compare.variants.ok: --set 'no_equals': expected KEY=VALUE" in str(e.value)
