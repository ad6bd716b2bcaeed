"""A record's ``tuner_mixin`` gives the generated tuner class (``peft_model.base_model``, and the
exported ``peft_kernel.<tuner_name>``) the mixin's methods: HF PEFT's method-specific tuner API
(``VBLoRAModel.get_nb_savable_parameters``). Other methods' tuners are unchanged."""

from __future__ import annotations

from typing import Iterator

import core_toy
import core_toy_mixin
import pytest
from core_toy import ToyConfig, make_stack
from core_toy_mixin import ToyMixConfig, ToyTunerMethods

import peft_kernel
from peft_kernel import get_peft_model
from peft_kernel.plugins import Registry, build_registry, set_registry


@pytest.fixture(autouse=True)
def toy_registry() -> Iterator[Registry]:
    registry = build_registry(entry_points=[], extra_plugins={"toy": core_toy, "toy_mixin": core_toy_mixin}, disabled=[])
    old = set_registry(registry)
    try:
        yield registry
    finally:
        set_registry(old)


def test_the_generated_tuner_has_the_mixins_methods():
    model = get_peft_model(make_stack(), ToyMixConfig(target_modules=["q", "v"]))
    assert type(model.base_model).__name__ == "ToyMixModel"
    assert isinstance(model.base_model, ToyTunerMethods)
    assert isinstance(model.base_model, peft_kernel.ToyMixModel)  # the exported class is the one in use
    assert model.base_model.count_adapter_layers() == model.count_adapter_layers() > 0  # PeftModel forwards


def test_other_tuners_have_no_mixin():
    model = get_peft_model(make_stack(), ToyConfig(target_modules=["q"]))
    assert type(model.base_model).__name__ == "ToyModel"
    assert not isinstance(model.base_model, ToyTunerMethods)
    assert not hasattr(model.base_model, "count_adapter_layers")
