"""IA3-specific checks: config errors as HF PEFT's, default feedforward modules, mixed batches against
HF peft single-adapter runs, several active adapters."""

import json

import pytest
import torch

from peft_kernel import ConfigError, get_peft_model
from peft_kernel_testing import check_mixed_batch_against_hf, run
from peft_kernel_testing.hf_oracle import check_active_adapters_against_hf
from peft_kernel_testing.models import make_inputs, make_model
from peft_kernel_ia3 import IA3Config

peft = pytest.importorskip("peft")


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def test_config_dict_is_hf_config_dict():
    ours = IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]).to_dict()
    hf = peft.IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]).to_dict()
    assert set(ours) == set(hf)
    for key in hf:
        if key not in ("target_modules", "feedforward_modules", "peft_type", "task_type"):
            assert ours[key] == hf[key], key
    assert sorted(ours["target_modules"]) == sorted(hf["target_modules"])
    assert IA3Config.from_dict(json.loads(json.dumps(ours))).feedforward_modules == {"wo"}


def test_feedforward_not_subset_of_targets_is_an_error():
    with pytest.raises(ConfigError, match="`feedforward_modules` should be a subset of `target_modules`"):
        IA3Config(target_modules=["a", "b"], feedforward_modules=["c"])
    with pytest.raises(ValueError):  # HF raises the same
        peft.IA3Config(target_modules=["a", "b"], feedforward_modules=["c"])
    IA3Config(target_modules="lin.*", feedforward_modules=["lin1"])  # a regex cannot be checked: accepted as HF


def test_wrong_types_name_the_field():
    with pytest.raises(ConfigError, match="init_ia3_weights"):
        IA3Config.from_dict({"peft_type": "IA3", "init_ia3_weights": "yes"})


def test_feedforward_defaults_follow_the_architecture():
    model = get_peft_model(make_model("llama"), IA3Config())
    config = model.peft_config["default"]
    assert config.target_modules == {"k_proj", "v_proj", "down_proj"}
    assert config.feedforward_modules == {"down_proj"}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if "ia3_l" in k and ".layers.0." in k}
    hf = peft.get_peft_model(make_model("llama"), peft.IA3Config())
    assert shapes == {k: tuple(v.shape) for k, v in hf.state_dict().items() if "ia3_l" in k and ".layers.0." in k}


def test_missing_feedforward_without_default_is_an_error():
    with pytest.raises(ConfigError, match="feedforward_modules"):
        get_peft_model(make_model("mlp"), IA3Config(target_modules=["lin0"]))


def test_unsupported_layer_type_is_a_clear_error():
    with pytest.raises(ValueError, match="Embedding"):
        get_peft_model(make_model("embedding"), IA3Config(target_modules=["emb"], feedforward_modules=[]))


@pytest.mark.parametrize("kind,kwargs", [
    ("mlp", dict(target_modules=["lin0", "lin1", "lin2"], feedforward_modules=["lin1"])),
    ("conv2d", dict(target_modules=["conv0", "conv1"], feedforward_modules=["conv1"])),
    ("llama", dict()),
])
def test_mixed_batch_rows_equal_hf_single_adapter_runs(kind, kwargs):
    """HF peft ignores adapter_names for this method; ours honours it."""
    check_mixed_batch_against_hf(kind, lambda: peft.IA3Config(**kwargs), randomize=_randomize)


def test_mixed_batch_with_adapters_on_different_modules_and_sides():
    """One adapter scales lin1's input (feedforward), another its output; another targets lin0 only."""
    model = get_peft_model(make_model("mlp"), IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]),
                           adapter_name="first")
    model.add_adapter("second", IA3Config(target_modules=["lin1"], feedforward_modules=[]))
    model.add_adapter("third", IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    _randomize(model, 5)
    model.eval()
    inputs = make_inputs("mlp")
    singles = {}
    for name in ("first", "second", "third"):
        model.set_adapter(name)
        singles[name] = run(model, inputs)
    names = ["third", "first", "second", "first"]
    mixed = run(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-6, rtol=0)


def test_several_active_adapters_multiply_like_hf_and_merge_consistently():
    kwargs = dict(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])
    check_active_adapters_against_hf("mlp", lambda: peft.IA3Config(**kwargs), lambda: IA3Config(**kwargs), randomize=_randomize)


def test_safe_merge_refuses_non_finite_vectors():
    model = get_peft_model(make_model("mlp"), IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    before = model.base_model.model.lin0.base_layer.weight.detach().clone()
    with torch.no_grad():
        model.base_model.model.lin0.ia3_l["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, before)


def test_exports():
    import peft_kernel

    assert peft_kernel.IA3Config is IA3Config
    assert peft_kernel.IA3Model.__name__ == "IA3Model"
    model = get_peft_model(make_model("mlp"), IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    assert type(model.base_model).__name__ == "IA3Model"
    assert isinstance(model.base_model.model.lin0, peft_kernel.IA3Layer)
