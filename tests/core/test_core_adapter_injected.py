"""``peft_kernel_adapter_injected``: called once per injected adapter, on every injection route,
after the adapter layers and ``modules_to_save`` wrappers are in place and before trainable flags
are set; only for the plugin's own configs by convention (here: the toy method's)."""

from __future__ import annotations

import types
from typing import Iterator

import core_toy
import pytest
from core_toy import ToyConfig, ToyLinear, make_stack

from peft_kernel import ModulesToSaveWrapper, get_peft_model, hookimpl, inject_adapter_in_model
from peft_kernel.plugins import Registry, build_registry, set_registry

SEEN: list[tuple[str, str, bool, bool]] = []


@hookimpl
def peft_kernel_adapter_injected(config, model, adapter_name):
    if isinstance(config, ToyConfig):
        head = model.get_submodule("head")
        classifier = model.get_submodule("classifier")
        SEEN.append((type(model).__name__, adapter_name, isinstance(head, ToyLinear) and head.has_adapter(adapter_name),
                     isinstance(classifier, ModulesToSaveWrapper)))


@pytest.fixture(autouse=True)
def toy_registry() -> Iterator[Registry]:
    SEEN.clear()
    plugin = types.SimpleNamespace(peft_kernel_adapter_injected=peft_kernel_adapter_injected)
    registry = build_registry(entry_points=[], extra_plugins={"toy": core_toy, "watcher": plugin}, disabled=[])
    old = set_registry(registry)
    try:
        yield registry
    finally:
        set_registry(old)


def _config() -> ToyConfig:
    return ToyConfig(target_modules=["head"], modules_to_save=["classifier"])


def test_called_once_per_adapter_with_layers_and_wrappers_in_place():
    model = get_peft_model(make_stack(), _config())
    model.add_adapter("second", _config())
    assert SEEN == [("Stack", "default", True, True), ("Stack", "second", True, True)]


def test_called_by_inject_adapter_in_model():
    inject_adapter_in_model(_config(), make_stack(), adapter_name="plain")
    assert SEEN == [("Stack", "plain", True, True)]
