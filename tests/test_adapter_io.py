"""One route for adapter I/O: ``get_peft_model_state_dict`` returns exactly what ``save_pretrained``
writes, ``set_peft_model_state_dict`` takes exactly that, and ``peft_kernel_map_state_dict`` runs on
both sides of every route (save, load, get, set, hotswap, load transactions)."""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import load_file

from peft_kernel import (
    LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, hookimpl, hotswap_adapter,
    set_peft_model_state_dict,
)
from peft_kernel.errors import CheckpointError
from peft_kernel_testing import make_inputs, make_model

SAVED_PREFIX = "renamed::"


def renaming_plugin(calls: list[str]) -> types.SimpleNamespace:
    """Writes LoRA keys under a prefix of its own and reads only that form back."""

    @hookimpl
    def peft_kernel_map_state_dict(config, state_dict, direction):
        if not isinstance(config, LoraConfig):
            return None
        calls.append(direction)
        if direction == "save":
            return {SAVED_PREFIX + k.removeprefix("base_model.model."): v for k, v in state_dict.items()}
        foreign = [k for k in state_dict if not k.startswith(SAVED_PREFIX)]
        if foreign:
            raise CheckpointError(f"not in the renamed format: {foreign[:2]}")
        return {"base_model.model." + k.removeprefix(SAVED_PREFIX): v for k, v in state_dict.items()}

    return types.SimpleNamespace(peft_kernel_map_state_dict=peft_kernel_map_state_dict)


def _model(seed: int = 0) -> PeftModel:
    torch.manual_seed(seed)
    return get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False)).eval()


def test_get_and_set_are_symmetric_and_match_save_pretrained(isolated_registry, tmp_path):
    calls: list[str] = []
    isolated_registry(disabled=[], extra_plugins={"rename": renaming_plugin(calls)})
    inputs = make_inputs("mlp")
    source, target = _model(0), _model(1)
    expected = source(**inputs)

    saved = get_peft_model_state_dict(source)
    assert saved and all(k.startswith(SAVED_PREFIX) for k in saved) and calls == ["save"]
    source.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "adapter_model.safetensors")
    assert set(on_disk) == set(saved)
    for key, value in saved.items():
        torch.testing.assert_close(on_disk[key], value)

    result = set_peft_model_state_dict(target, saved)  # get -> set round-trips
    assert result.missing_keys == [] and calls[-1] == "load"
    torch.testing.assert_close(target(**inputs), expected)
    loaded = PeftModel.from_pretrained(make_model("mlp"), tmp_path)
    torch.testing.assert_close(loaded(**inputs), expected)


def test_hotswap_and_failed_loads_go_through_the_same_route(isolated_registry, tmp_path):
    calls: list[str] = []
    isolated_registry(disabled=[], extra_plugins={"rename": renaming_plugin(calls)})
    inputs = make_inputs("mlp")
    _model(1).save_pretrained(tmp_path / "other")
    model = _model(0)
    before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    with pytest.raises(CheckpointError):  # a checkpoint without the renamed keys: nothing changes
        set_peft_model_state_dict(model, {"base_model.model.lin0.lora_A.weight": torch.zeros(8, 10)})
    for key, value in get_peft_model_state_dict(model).items():
        torch.testing.assert_close(value, before[key])
    hotswap_adapter(model, tmp_path / "other", "default")
    torch.testing.assert_close(model(**inputs), _model(1)(**inputs))


def test_only_adapter_io_maps_state_dicts():
    """The core calls ``map_state_dict`` (the hook's facade) in adapter_io alone, and there once per
    direction; the registry only defines it."""
    import pathlib
    import re

    import peft_kernel

    core = pathlib.Path(peft_kernel.__file__).parent
    callers = {p.relative_to(core).as_posix(): len(re.findall(r"\.map_state_dict\(", p.read_text()))
               for p in core.rglob("*.py")}
    assert {name: n for name, n in callers.items() if n} == {"adapter_io.py": 2}
