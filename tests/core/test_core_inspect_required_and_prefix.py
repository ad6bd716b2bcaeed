"""``peft-kernel inspect`` on a method whose record prefix marks only some of its tensors (AdaLoRA's
``lora_E`` beside ``lora_A`` / ``lora_B``) and whose config has a required field (a ``{"example":
...}`` in its metadata, AdaLoRA's ``total_step``): the other tensors of an adapted module are the
adapter's, not "saved in full"; the other fields are compared with the defaults, the required one is
always shown."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import attrs
import core_toy
import pytest
from core_toy import make_stack

from peft_kernel import get_peft_model, hookimpl
from peft_kernel.cli import main
from peft_kernel.errors import ConfigError
from peft_kernel.plugins import build_registry, set_registry
from peft_kernel.records import MethodRecord


@attrs.define(kw_only=True)
class NeedsStepsConfig(core_toy.ToyConfig):
    peft_type: Optional[Union[str, Any]] = "NEEDSSTEPS"
    steps: Optional[int] = attrs.field(default=None, metadata={"example": 100})

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.steps is None:
            raise ConfigError("NeedsStepsConfig.steps is required")


def _make_layer(config: Any, adapter_name: str, base_layer: Any, module_name: str) -> Any:
    layer = core_toy.ToyLinear(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(MethodRecord(peft_type="NEEDSSTEPS", config_class=NeedsStepsConfig, prefix="toy_b",
                          tuner_name="NeedsStepsModel", layer_factory=f"{__name__}:_make_layer"))


@pytest.fixture(autouse=True)
def registry() -> Iterator[None]:
    plugin = types.SimpleNamespace(peft_kernel_register_methods=peft_kernel_register_methods)
    old = set_registry(build_registry(entry_points=[], extra_plugins={"needssteps": plugin}, disabled=[]))
    try:
        yield
    finally:
        set_registry(old)


def test_inspect_counts_every_tensor_of_an_adapted_module_as_the_adapters(tmp_path: Path, capsys) -> None:
    model = get_peft_model(make_stack(), NeedsStepsConfig(target_modules=["head"], steps=100, alpha=2.0))
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)  # one adapter: one object
    assert sorted(info["tensors"]) == ["base_model.model.head.toy_a", "base_model.model.head.toy_b"]
    assert info["targeted_modules"] == ["head"] and info["full_modules"] == []
    assert info["config_defaults_known"] is True
    assert info["config"]["steps"] == 100  # required: shown although it equals the example value
    assert info["config"]["alpha"] == 2.0 and "init_weights" not in info["config"]  # the rest against defaults
