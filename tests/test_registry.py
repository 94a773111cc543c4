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


def test_mapping_access():
    reg = Registry("loss")
    reg.register("kl", int)
    reg.register("ce", float)
    assert reg["kl"] is int and reg.get("ce") is float
    assert reg.get("nope", None) is None and reg.get("nope", str) is str
    assert list(reg) == ["ce", "kl"] and len(reg) == 2
    reg.register("focal", bool)
    with pytest.raises(KeyError) as e:
        reg["focla"]
    assert isinstance(e.value, KdError)
    assert str(e.value).startswith("unknown loss 'focla' (did you mean 'focal'?)")
    assert 3 not in reg


def _tiny(name):
    return f"tiny:{name}" if name.startswith("tiny_") else None


def test_resolvers_come_after_registered_names():
    reg = Registry("backbone")
    reg.register("tiny_special", "registered")
    with reg.owned_by("kd-tiny 1.0"):
        resolver = reg.add_resolver(
            "tiny", _tiny, "any tiny_* name", candidates=lambda: ["tiny_a", "tiny_b"]
        )
    assert resolver.owner == "kd-tiny 1.0" and reg.resolvers() == [resolver]
    assert reg.get("tiny_special") == "registered" and reg["tiny_x"] == "tiny:tiny_x"
    assert "tiny_x" in reg and "huge_x" not in reg
    assert reg.owner("tiny_x") == "kd-tiny 1.0" and reg.owner("tiny_special") == "python"
    assert reg.list() == ["tiny_special"] and len(reg) == 1  # resolved names are not listed
    message = reg.unknown_message("tiny_aa")
    assert "'tiny_a'" in message and "any tiny_* name" in message and "\n" not in message


def test_resolvers_are_tried_in_order_and_named_once():
    reg = Registry("backbone")
    reg.add_resolver("first", lambda n: "first" if n == "x" else None, "x")
    reg.add_resolver("second", lambda n: "second", "anything")
    assert reg["x"] == "first" and reg["y"] == "second"
    with pytest.raises(KdError, match="resolver 'first' is added twice"):
        reg.add_resolver("first", lambda n: None, "again")
    with pytest.raises(KdError, match="lower_snake_case"):
        reg.add_resolver("Bad-Name", lambda n: None, "bad")


def test_keys_values_items_like_a_mapping():
    reg = Registry("loss")
    reg.register("kl", int)
    reg.register("ce", float)
    assert reg.keys() == ["ce", "kl"] and reg.values() == [float, int]
    assert reg.items() == [("ce", float), ("kl", int)] and dict(reg.items())["kl"] is int
    assert {name: reg[name] for name in reg} == dict(reg.items())


def test_check_refuses_a_wrong_kind_naming_the_plugin():
    reg = Registry("loss", check=lambda obj: None if obj is int else "expected int")
    with reg.owned_by("kd-demo 0.1"), pytest.raises(KdError) as e:
        reg.register("bad", str)
    assert str(e.value) == "loss 'bad' from plugin 'kd-demo 0.1': expected int"
    assert "bad" not in reg
    reg.register("good", int)
    assert reg["good"] is int


def test_resolved_components_are_kind_checked():
    reg = Registry("backbone", check=lambda obj: None if callable(obj) else "not callable")
    with reg.owned_by("kd-bad 1.0"):
        reg.add_resolver("strings", lambda name: f"made {name}", "any name")
    with pytest.raises(KdError, match="backbone 'x' from plugin 'kd-bad 1.0': not callable"):
        reg["x"]
