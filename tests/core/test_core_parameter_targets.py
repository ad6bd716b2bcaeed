"""Parameter targets (``target_parameters``, ``peft_kernel_create_parameter_layer``,
``ParameterLayer``) on the inline toy ``core_toy_param``: matching by full name or dotted suffix,
nested layers for several parameters of one module, the module's own forward seeing ``W + delta``,
merge / unload, save / load keys, and the errors. Expectations are computed by hand."""

from __future__ import annotations

import copy
from typing import Iterator

import core_toy
import core_toy_param
import pytest
import torch
from core_toy_param import ToyParam, ToyParamConfig, make_moe
from torch.nn.utils import parametrize

from safetensors.torch import load_file

from peft_kernel import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft_kernel.errors import MixedBatchError, TargetNotFoundError
from peft_kernel.plugins import Registry, build_registry, set_registry

X = torch.linspace(-1, 1, 4 * 8).reshape(4, 8)
BOTH = ["experts.w_in", "experts.w_out"]


@pytest.fixture(autouse=True)
def toy_registry() -> Iterator[Registry]:
    registry = build_registry(entry_points=[], extra_plugins={"toy": core_toy, "toy_param": core_toy_param}, disabled=[])
    old = set_registry(registry)
    try:
        yield registry
    finally:
        set_registry(old)


def config(**kwargs) -> ToyParamConfig:
    return ToyParamConfig(**{"target_modules": [], "target_parameters": BOTH, "init_weights": False, "alpha": 2.0, **kwargs})


def by_hand(model: PeftModel, adapter: str = "default") -> torch.Tensor:
    """The base model with ``W += alpha * d`` written into every adapted parameter."""
    reference = copy.deepcopy(model.get_base_model())
    with torch.no_grad():
        for name, module in model.get_base_model().named_modules():
            if isinstance(module, ToyParam) and adapter in module.toy_d:
                owner = reference.get_submodule(name.split(".base_layer")[0])
                while isinstance(owner, ToyParam):
                    owner = owner.base_layer
                getattr(owner, module.parameter_name).add_(module.delta_weight(adapter))
        for name, module in list(reference.named_modules()):
            if isinstance(module, ToyParam) and ".base_layer" not in name:
                parent, _, child = name.rpartition(".")
                inner = module
                while isinstance(inner, ToyParam):
                    inner = inner.base_layer
                setattr(reference.get_submodule(parent), child, inner)
        return reference(X)


def test_two_parameters_of_one_module_nest_and_the_forward_sees_both_deltas():
    model = get_peft_model(make_moe(), config())
    outer = model.get_base_model().blocks[0]["experts"]
    assert isinstance(outer, ToyParam) and outer.parameter_name == "w_out"
    assert isinstance(outer.base_layer, ToyParam) and outer.base_layer.parameter_name == "w_in"
    assert model.base_model.targeted_parameter_names == [
        "blocks.0.experts.w_in", "blocks.0.experts.w_out", "blocks.1.experts.w_in", "blocks.1.experts.w_out"]
    assert model.base_model.targeted_module_names == []
    with torch.no_grad():
        assert torch.allclose(model(X), by_hand(model), atol=1e-6)
        assert not torch.allclose(model(X), make_moe()(X), atol=1e-3)
    experts = outer.base_layer.base_layer
    assert not parametrize.is_parametrized(experts) and type(experts).__name__ == "Experts"


def test_target_modules_none_means_no_module_targets():
    model = get_peft_model(make_moe(), config(target_modules=None))
    assert model.peft_config["default"].target_modules == set() and model.base_model.targeted_module_names == []


def test_keys_are_nested_paths_and_a_save_load_round_trip_is_exact(tmp_path):
    model = get_peft_model(make_moe(), config())
    keys = sorted(get_peft_model_state_dict(model))
    assert keys[:2] == ["base_model.model.blocks.0.experts.base_layer.toy_d", "base_model.model.blocks.0.experts.toy_d"]
    model.save_pretrained(tmp_path)
    loaded = get_peft_model(make_moe(), config(init_weights=True))
    set_peft_model_state_dict(loaded, load_file(tmp_path / "adapter_model.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


def test_full_names_suffixes_and_mixing_with_module_targets():
    model = get_peft_model(make_moe(), config(target_modules=["proj"], target_parameters=["blocks.1.experts.w_in"]))
    assert model.base_model.targeted_parameter_names == ["blocks.1.experts.w_in"]
    assert model.base_model.targeted_module_names == ["blocks.0.proj", "blocks.1.proj"]
    assert not isinstance(model.get_base_model().blocks[0]["experts"], ToyParam)


def test_merge_unmerge_merge_and_unload_and_unload():
    base = make_moe()
    model = get_peft_model(copy.deepcopy(base), config())
    with torch.no_grad():
        expected = model(X)
        model.merge_adapter()
        assert torch.allclose(model(X), expected, atol=1e-6)
        model.unmerge_adapter()
        assert torch.allclose(model(X), expected, atol=1e-6)
        with model.disable_adapter():
            assert torch.allclose(model(X), base(X), atol=1e-6)
        merged = copy.deepcopy(model).merge_and_unload()
        assert type(merged.blocks[0]["experts"]).__name__ == "Experts"
        assert torch.allclose(merged(X), expected, atol=1e-6)
    plain = model.unload()
    assert list(plain.state_dict()) == list(base.state_dict())
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(plain.state_dict().values(), base.state_dict().values()))


def test_training_reaches_the_adapter_only():
    model = get_peft_model(make_moe(), config())
    model.train()
    model(X).sum().backward()
    experts = model.get_base_model().blocks[0]["experts"]
    assert experts.toy_d["default"].grad is not None and experts.base_layer.toy_d["default"].grad is not None
    assert experts.base_layer.base_layer.w_in.grad is None


def test_several_adapters_and_mixed_batches_refused():
    model = get_peft_model(make_moe(), config())
    model.add_adapter("other", config(alpha=-1.0))
    model.set_adapter("other")
    with torch.no_grad():
        assert torch.allclose(model(X), by_hand(model, "other"), atol=1e-6)
    model.eval()
    with pytest.raises(MixedBatchError, match="target_parameters"):
        model(X, adapter_names=["default", "other", "default", "__base__"])
    with pytest.raises(ValueError, match="all adapters must target the same set of parameters"):
        model.add_adapter("third", config(target_parameters=["experts.w_in"]))


@pytest.mark.parametrize("targets", [["experts.nope"], ["experts.table"], ["experts"], ["w_in.x"]])
def test_names_that_match_no_parameter_raise(targets):
    with pytest.raises(TargetNotFoundError, match="no `target_parameters` found"):
        get_peft_model(make_moe(), config(target_parameters=targets))


def test_a_parameter_of_a_module_target_is_refused():
    with pytest.raises(ValueError, match="not also targeted with `target_modules`"):
        get_peft_model(make_moe(), config(target_modules=["proj"], target_parameters=["proj.weight"]))


def test_per_token_adapter_weights_are_refused():
    from peft_kernel.routing import AdapterMix, adapter_mix

    model = get_peft_model(make_moe(), config())
    with adapter_mix(AdapterMix(["default"], lambda layer: torch.ones(4, 1))), pytest.raises(MixedBatchError, match="per token"):
        model(X)
