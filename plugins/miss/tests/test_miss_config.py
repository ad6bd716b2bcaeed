"""MissConfig has HF PEFT's fields, defaults and adapter_config.json, and names the bad field."""

import dataclasses
import json

import attrs
import pytest

from peft_kernel import ConfigError, PeftConfig
from peft_kernel_miss import MissConfig

peft = pytest.importorskip("peft")

COMMON = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
          "peft_version"}


def test_fields_and_defaults_are_hf():
    ours = {f.name: f.default for f in attrs.fields(MissConfig) if f.name not in COMMON}
    hf = {f.name: f.default for f in dataclasses.fields(peft.MissConfig) if f.name not in COMMON}
    assert ours == hf


def test_config_dict_round_trips_with_hf():
    kwargs = dict(r=8, miss_dropout=0.1, mini_r=2, init_weights="mini", target_modules=["q", "v"],
                  layers_to_transform=[0], layers_pattern="layers", bias="miss_only")
    ours, hf = MissConfig(**kwargs).to_dict(), peft.MissConfig(**kwargs).to_dict()
    assert set(ours) == set(hf)
    for key in hf:
        if key not in ("target_modules", "peft_type", "peft_version"):
            assert ours[key] == hf[key], key
    assert ours["peft_type"] == "MISS"
    back = PeftConfig.from_dict(json.loads(json.dumps(hf, default=sorted)))
    assert isinstance(back, MissConfig) and back.init_weights == "mini" and back.mini_r == 2
    assert peft.MissConfig(**{k: v for k, v in ours.items() if k != "peft_type"}).init_weights == "mini"


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), r"\$\.r must be an integer from 1"),
    (dict(r=-1), r"\$\.r must be an integer from 1"),
    (dict(init_weights="mini", mini_r=0), r"\$\.mini_r must be an integer from 1"),
    (dict(miss_dropout=1.5), r"miss_dropout must be a probability"),
    (dict(miss_dropout=-0.1), r"miss_dropout must be a probability"),
    (dict(bias="lora_only"), r"\$\.bias must be one of"),
    (dict(layers_pattern="layers"), "`layers_to_transform` must also be specified"),
])
def test_bad_configs_raise_config_error_naming_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MissConfig(**kwargs)


def test_unknown_init_weights_names_the_field():
    """HF PEFT silently treats an unknown string as the default; ours refuses it."""
    with pytest.raises(ConfigError, match=r"init_weights"):
        PeftConfig.from_dict({"peft_type": "MISS", "init_weights": "bone"})

