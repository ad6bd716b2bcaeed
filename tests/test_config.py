"""Configs: HF PEFT's fields and JSON, strict types with JSON paths, forward-compatible unknown keys."""

from __future__ import annotations

import json
import warnings

import pytest

from peft_kernel import LoraConfig, PeftConfig, PeftType, TaskType
from peft_kernel.errors import ConfigError, UnknownMethodError


def test_lora_config_has_every_hf_field_with_hf_defaults():
    peft = pytest.importorskip("peft")
    ours = LoraConfig().to_dict()
    theirs = peft.LoraConfig().to_dict()
    theirs = {k: (v.value if hasattr(v, "value") else v) for k, v in theirs.items()}
    assert set(ours) == set(theirs), f"missing: {set(theirs) - set(ours)}, extra: {set(ours) - set(theirs)}"
    for key in ours:
        if key in ("peft_version",):
            continue
        assert ours[key] == theirs[key], f"default of {key}: ours {ours[key]!r} vs HF {theirs[key]!r}"


def test_hf_written_config_loads_and_round_trips(tmp_path):
    peft = pytest.importorskip("peft")
    hf = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM",
                         rank_pattern={"q_proj": 2}, layers_to_transform=[0, 1], layers_pattern="layers")
    hf.save_pretrained(tmp_path)
    ours = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(ours, LoraConfig)
    assert ours.r == 4 and ours.use_dora and ours.task_type is TaskType.CAUSAL_LM and ours.peft_type is PeftType.LORA
    assert ours.target_modules == {"q_proj", "v_proj"} and ours.rank_pattern == {"q_proj": 2}
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert back.to_dict()["rank_pattern"] == {"q_proj": 2} and back.use_dora and back.r == 4
    text = (tmp_path / "ours" / "adapter_config.json").read_text()
    assert list(json.loads(text)) == sorted(json.loads(text)), "keys must be written sorted"


def test_regex_target_modules_survive_json(tmp_path):
    LoraConfig(target_modules=r".*\.(q|v)_proj").save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).target_modules == r".*\.(q|v)_proj"


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("r", "8", "$.r: expected int, got str '8'"),
        ("r", 8.5, "$.r: expected int, got float 8.5"),
        ("r", True, "$.r: expected int, got bool True"),
        ("lora_dropout", "0.1", "$.lora_dropout: expected float, got str"),
        ("target_modules", 7, "$.target_modules: expected list[str] | set[str] | str | null, got int 7"),
        ("target_modules", ["q", 3], "$.target_modules: expected list[str] | set[str] | str | null"),
        ("bias", "some", "$.bias: expected 'none' | 'all' | 'lora_only', got str 'some'"),
        ("rank_pattern", ["a"], "$.rank_pattern"),
        ("use_dora", "yes", "$.use_dora: expected bool, got str 'yes'"),
    ],
)
def test_wrong_field_types_name_the_json_path(field, value, expected):
    data = {**LoraConfig().to_dict(), field: value}
    with pytest.raises(ConfigError) as info:
        PeftConfig.from_dict(data)
    assert expected in str(info.value)


def test_errors_in_a_file_name_the_file(tmp_path):
    data = {**LoraConfig().to_dict(), "r": "eight"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"adapter_config.json: invalid LoraConfig: \$\.r: expected int"):
        PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PeftConfig.from_pretrained(tmp_path)


def test_unknown_keys_from_newer_versions_warn_and_are_dropped():
    data = {**LoraConfig(r=4).to_dict(), "shiny_new_option": True, "another_one": {"x": 1}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = PeftConfig.from_dict(data)
    assert config.r == 4
    assert any("another_one, shiny_new_option" in str(w.message) for w in caught)


def test_unknown_peft_type_is_a_clear_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "NO_SUCH_METHOD", "r": 4}))
    with pytest.raises(UnknownMethodError, match="Unknown peft_type 'NO_SUCH_METHOD'.*installed methods:.*LORA"):
        PeftConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="peft_type: required field missing"):
        PeftConfig.from_dict({"r": 4})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(use_dora=True, lora_bias=True), "lora_bias=True is not supported for DoRA"),
        (dict(layers_pattern="layers"), "`layers_to_transform` must also be specified"),
        (dict(target_modules=".*q", layers_to_transform=[0]), "cannot be used when `target_modules` is a str"),
        (dict(r=0), "r must be a positive integer"),
        (dict(init_lora_weights="nonsense"), "init_lora_weights='nonsense' is not valid"),
        (dict(task_type="TRANSLATION"), "task_type 'TRANSLATION' is not one of"),
    ],
)
def test_cross_field_rules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_layer_method_configs_inherit_the_targeting_fields():
    """Every layer method of this repository's ``plugins/`` takes ``target_modules``... from the core's
    ``TargetModulesConfig`` / ``TargetedConfig`` instead of re-declaring them."""
    import pathlib

    import attrs

    from peft_kernel.config import TargetedConfig, TargetModulesConfig
    from peft_kernel.plugins import get_registry

    names = ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern")
    root = pathlib.Path(__file__).parents[1]
    ours = {"peft-kernel-" + p.parent.name.replace("_", "-") for p in root.glob("plugins/*/pyproject.toml")}
    checked = 0
    for record in get_registry().methods.values():
        if record.distribution not in ours:
            continue  # a third party's (examples/) may declare its own fields
        fields = attrs.fields_dict(record.config_class)
        if "target_modules" not in fields:
            continue  # prompt learning
        checked += 1
        assert issubclass(record.config_class, TargetModulesConfig), record.config_class
        for name in names:
            if name in fields:  # inherited, or taken away (init=False: not an argument, not saved) where HF's
                # config lacks it (C3A has no exclude_modules); never re-typed or re-defaulted
                assert fields[name].inherited or not fields[name].init, f"{record.config_class.__name__} re-declares {name}"
        if "layers_to_transform" in fields:
            assert issubclass(record.config_class, TargetedConfig), record.config_class
    assert checked


@pytest.mark.parametrize("peft_type", ["LORA", "LOHA", "LOKR", "OFT"])
def test_targeted_config_rules_hold_for_every_method(peft_type):
    from peft_kernel.plugins import get_registry

    if peft_type not in get_registry().methods:
        pytest.skip(f"no {peft_type} plugin installed")
    cls = get_registry().method(peft_type).config_class
    with pytest.raises(ConfigError, match="`layers_to_transform` must also be specified"):
        cls(target_modules=["q"], layers_pattern="layers")
    with pytest.raises(ConfigError, match="`layers_to_transform` cannot be used when `target_modules` is a str"):
        cls(target_modules=".*q", layers_to_transform=[0])
    with pytest.raises(ConfigError, match="`layers_pattern` cannot be used when `target_modules` is a str"):
        cls(target_modules=".*q", layers_pattern="layers")
    config = cls(target_modules=["q", "v", "q"], exclude_modules=("k",))
    assert config.target_modules == {"q", "v"} and config.exclude_modules == {"k"}
