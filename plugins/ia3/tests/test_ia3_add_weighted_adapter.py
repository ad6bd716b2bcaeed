"""IA3's ``add_weighted_adapter`` (HF PEFT's ``IA3Model.add_weighted_adapter``) against HF peft:
``sum_i w_i l_i`` on the union of the adapters' target and feedforward modules, negative weights,
``modules_to_save``, and HF's refusals; the combination goes through ``peft_kernel_combine_adapters``."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import peft_kernel as pk  # noqa: E402
from peft_kernel_testing.hf_oracle import hf_oracle  # noqa: E402
from peft_kernel_testing.models import make_inputs, make_model, output_tensor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def pair(configs: dict[str, dict]):
    base = make_model("mlp")
    names = list(configs)
    with hf_oracle("HF peft building the reference IA3 adapters"):
        hf = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**configs[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            hf.add_adapter(name, peft.IA3Config(**configs[name]))
    ours = pk.get_peft_model(copy.deepcopy(base), pk.IA3Config(**configs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        ours.add_adapter(name, pk.IA3Config(**configs[name]))
    randomize(hf, 3)
    for name in names:
        pk.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(hf, adapter_name=name), adapter_name=name)
    return hf.eval(), ours.eval()


def assert_same(hf, ours, name):
    theirs = peft.get_peft_model_state_dict(hf, adapter_name=name)
    mine = pk.get_peft_model_state_dict(ours, adapter_name=name)
    assert sorted(theirs) == sorted(mine)
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], atol=1e-6, rtol=0, msg=key)
    assert ours.peft_config[name].target_modules == hf.peft_config[name].target_modules
    assert ours.peft_config[name].feedforward_modules == hf.peft_config[name].feedforward_modules
    hf.set_adapter(name)
    ours.set_adapter(name)
    inputs = make_inputs("mlp")
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(ours(**inputs)), output_tensor(hf(**inputs)), atol=1e-5, rtol=0)


def test_linear_combination_equals_hf():
    hf, ours = pair({"a": dict(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]),
                     "b": dict(target_modules=["lin1", "lin2"], feedforward_modules=["lin1"]),
                     "c": dict(target_modules=["lin0"], feedforward_modules=[])})
    with hf_oracle("HF peft IA3 add_weighted_adapter"):
        hf.add_weighted_adapter(["a", "b", "c"], [0.6, -0.3, 1.1], "m")
    ours.add_weighted_adapter(["a", "b", "c"], [0.6, -0.3, 1.1], "m")
    assert_same(hf, ours, "m")
    ours.add_weighted_adapter(["a", "b"], [0.5, 0.5], "lin", combination_type="linear")  # the explicit name
    with hf_oracle("HF peft IA3 add_weighted_adapter"):
        hf.add_weighted_adapter(["a", "b"], [0.5, 0.5], "lin")
    assert_same(hf, ours, "lin")


def test_modules_to_save_and_refusals_as_hf():
    hf, ours = pair({"a": dict(target_modules=["lin0"], feedforward_modules=[], modules_to_save=["lin2"]),
                     "b": dict(target_modules=["lin0"], feedforward_modules=[])})
    with hf_oracle("HF peft IA3 add_weighted_adapter"):
        hf.add_weighted_adapter(["a", "b"], [1.0, 2.0], "m")
    ours.add_weighted_adapter(["a", "b"], [1.0, 2.0], "m")
    assert_same(hf, ours, "m")
    for model in (hf, ours):
        with pytest.raises(ValueError, match="Adapter nope does not exist"):
            model.add_weighted_adapter(["a", "nope"], [1.0, 1.0], "x")
    with pytest.raises(ValueError, match="combine linearly only"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "x", combination_type="ties", density=0.5)
    with pytest.raises(ValueError, match="combine linearly only"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "x", combination_type="linear", density=0.5)
    assert "x" not in ours.peft_config
    hf2, ours2 = pair({"a": dict(target_modules=["lin0"], feedforward_modules=[], modules_to_save=["lin2"]),
                       "b": dict(target_modules=["lin0"], feedforward_modules=[], modules_to_save=["lin2"])})
    for model in (hf2, ours2):
        with pytest.raises(ValueError, match="modules_to_save"):
            model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m")
