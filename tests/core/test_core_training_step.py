"""The generic training hook ``peft_kernel_training_step`` (called by training loops after each
optimizer step): a toy plugin's hook forwards each step to a method its ``tuner_mixin`` gives the
tuner (as AdaLoRA's rank reallocation does); a malformed ``tuner_mixin`` fails its plugin."""

from __future__ import annotations

import types
from typing import Any, Callable, Iterator

import attrs
import core_toy
import pytest
import torch
from core_toy import ToyConfig, make_stack, make_x

from peft_kernel import get_peft_model, hookimpl
from peft_kernel.plugins import Registry, build_registry, get_registry, set_registry
from peft_kernel.records import MethodRecord


class StepCounter:
    """The toy's ``tuner_mixin``: a method the tuner (and, by fallback, the ``PeftModel``) gains."""

    def update_and_allocate(self, global_step: int) -> None:
        self.__dict__.setdefault("seen_steps", []).append(global_step)
        with torch.no_grad():  # a visible in-place change of the adapter, as a rank reallocation makes
            for module in self.model.modules():
                if isinstance(module, core_toy.ToyLinear):
                    module.toy_b["default"].mul_(0.5)


@attrs.define(kw_only=True)
class StepToyConfig(ToyConfig):
    peft_type: Any = "STEPTOY"


def _make_layer(config: Any, adapter_name: str, base_layer: Any, module_name: str) -> Any:
    layer = core_toy.ToyLinear(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer


def step_plugin(tuner_mixin: str = f"{__name__}:StepCounter") -> types.SimpleNamespace:
    @hookimpl
    def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
        register(MethodRecord(peft_type="STEPTOY", config_class=StepToyConfig, prefix="toy_",
                              tuner_name="StepToyModel", tuner_mixin=tuner_mixin,
                              layer_factory=f"{__name__}:_make_layer"))

    @hookimpl
    def peft_kernel_training_step(model: Any, global_step: int) -> None:
        configs = getattr(model, "peft_config", {})
        if any(isinstance(c, StepToyConfig) for c in configs.values()):
            model.base_model.update_and_allocate(global_step)

    return types.SimpleNamespace(peft_kernel_register_methods=peft_kernel_register_methods,
                                 peft_kernel_training_step=peft_kernel_training_step)


@pytest.fixture
def registry() -> Iterator[Registry]:
    built = build_registry(entry_points=[], extra_plugins={"steptoy": step_plugin()}, disabled=[])
    old = set_registry(built)
    try:
        yield built
    finally:
        set_registry(old)


def test_training_step_reaches_every_implementation_with_the_step(registry: Registry) -> None:
    model = get_peft_model(make_stack(), StepToyConfig(target_modules=["v"], init_weights=False))
    before = model(make_x()).detach()
    for step in range(3):
        registry.training_step(model, step)
    assert model.base_model.seen_steps == [0, 1, 2]
    assert not torch.allclose(model(make_x()), before)  # the hook changed the adapter in place
    get_registry().training_step(make_stack(), 3)  # not a model of the method: the hook leaves it alone
    assert model.base_model.seen_steps == [0, 1, 2]


def test_a_malformed_tuner_mixin_fails_the_plugin() -> None:
    built = build_registry(entry_points=[], extra_plugins={"steptoy": step_plugin("not a path")}, disabled=[])
    status = built.status_of("steptoy")
    assert status.status == "failed" and "tuner_mixin" in status.error and "STEPTOY" not in built.methods
