import pytest

from kdtoolkit.errors import KdError
from kdtoolkit.plugins.registry import Registry


def test_register_decorator_and_call_and_get():
    reg = Registry("loss")

    @reg.register("focal_loss")
    class Focal:
        pass

    reg.register("dice", object)
    assert reg.get("focal_loss") is Focal
    assert reg.get("dice") is object
    assert "dice" in reg and "nope" not in reg
    assert len(reg) == 2


def test_unknown_name_lists_close_matches():
    reg = Registry("loss")
    reg.register("attention_mse", object)
    reg.register("kl", object)
    with pytest.raises(KdError) as e:
        reg.get("atention_mse")
    message = str(e.value)
    assert "unknown loss 'atention_mse'" in message
    assert "'attention_mse'" in message
    assert "kd plugins" in message
    assert "\n" not in message


def test_list_with_glob_patterns():
    reg = Registry("backbone")
    for name in ("resnet18", "resnet50", "convnext_tiny"):
        reg.register(name, object)
    assert reg.list() == ["convnext_tiny", "resnet18", "resnet50"]
    assert reg.list("resnet*") == ["resnet18", "resnet50"]
    assert reg.list("*tiny") == ["convnext_tiny"]
    assert reg.list("vit*") == []


def test_duplicate_names_both_owners():
    reg = Registry("task")
    with reg.owned_by("kd-sos 0.1"):
        reg.register("sos", object)
    with reg.owned_by("kd-other 2.0"), pytest.raises(KdError) as e:
        reg.register("sos", object)
    assert "kd-sos 0.1" in str(e.value) and "kd-other 2.0" in str(e.value)
    assert reg.owner("sos") == "kd-sos 0.1"


@pytest.mark.parametrize("bad", ["CamelCase", "with-dash", "", "sp ace"])
def test_names_must_be_snake_case(bad):
    with pytest.raises(KdError, match="lower_snake_case"):
        Registry("loss").register(bad, object)
