"""MiSS against HF PEFT beyond the conformance suite: initialisation per ``init_weights``, dropout
in training, mixed batches against HF single-adapter runs, several active adapters (Bat folds them
in order), Bat's unmerge, ``safe_merge``, and the layer errors."""

import pytest
import torch
from torch import nn

from peft_kernel import ConfigError, PeftModel, TargetNotFoundError, get_peft_model
from peft_kernel_testing import check_mixed_batch_against_hf, run
from peft_kernel_testing.hf_oracle import check_active_adapters_against_hf
from peft_kernel_testing.models import make_inputs, make_model
from peft_kernel_miss import MissConfig

peft = pytest.importorskip("peft")


def _pair(seed=0, **kwargs):
    """(ours, HF's) on the same MLP, each built right after ``torch.manual_seed(seed)``."""
    kwargs = {"r": 4, "target_modules": ["lin0", "lin1"], **kwargs}
    torch.manual_seed(seed)
    ours = get_peft_model(make_model("mlp"), MissConfig(**kwargs))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(make_model("mlp"), peft.MissConfig(**kwargs))
    return ours, theirs


def _blocks(model):
    return {k: v for k, v in model.state_dict().items() if "miss_block" in k}


@pytest.mark.parametrize("init_weights", [True, False, "bat", "mini"])
def test_initial_blocks_equal_hf(init_weights):
    """Same names, shapes and values (False: HF's kaiming-uniform draw, bit for bit)."""
    ours, theirs = _pair(init_weights=init_weights, mini_r=2, target_modules=["lin1"])
    a, b = _blocks(ours), _blocks(theirs)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape
        assert torch.equal(a[key], b[key]), key
    if init_weights is not False:
        assert not any(v.any() for v in a.values()), "a True/bat/mini block starts at zero"


@pytest.mark.parametrize("init_weights", [False, "mini"])
def test_dropout_in_training_equals_hf(init_weights):
    """Same dropout masks under the same seed (lin0's 10 inputs are zero-padded to 12 first)."""
    ours, theirs = _pair(init_weights=init_weights, mini_r=2, miss_dropout=0.5)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "miss_block" in name:
                p.normal_(0, 0.3)
    theirs.load_state_dict(ours.state_dict())
    x = make_inputs("mlp")["x"]
    ours.train()
    theirs.train()
    torch.manual_seed(11)
    got = ours(x)
    torch.manual_seed(11)
    expected = theirs(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(got, ours.eval()(x)), "dropout changed nothing in training"


@pytest.mark.parametrize("init_weights", [True, "bat", "mini"])
def test_mixed_batch_rows_equal_hf_single_runs(init_weights):
    check_mixed_batch_against_hf(
        "llama", lambda: peft.MissConfig(r=4, mini_r=4, init_weights=init_weights, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("init_weights", [True, "bat"])
def test_two_active_adapters_equal_hf(init_weights):
    """Balance adapters add; Bat adapters fold one after another (HF's order), merged or not."""
    config = dict(r=4, init_weights=init_weights, target_modules=["lin1"])
    check_active_adapters_against_hf("mlp", lambda: peft.MissConfig(**config), lambda: MissConfig(**config),
                                     merge_tolerance=1e-5)


def _perturbed(**kwargs):
    model = get_peft_model(make_model("mlp"), MissConfig(r=4, target_modules=["lin1"], **kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "miss_block" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    return model.eval()


def test_bat_merge_is_nonlinear_and_unmerge_restores_the_base():
    model = _perturbed(init_weights="bat")
    layer = model.base_model.model.lin1
    base = layer.base_layer.weight.detach().clone()
    block = layer.miss_block["default"].detach()
    expected = base.reshape(4, 4, 4, 4).transpose(1, 2) @ block.unsqueeze(1) + block.unsqueeze(1)
    torch.testing.assert_close(layer.delta_weight("default"), expected.transpose(1, 2).reshape(16, 16))
    model.merge_adapter()
    assert not torch.allclose(layer.base_layer.weight, base)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("init_weights", [True, "bat", "mini"])
def test_safe_merge_refuses_non_finite_and_leaves_the_weights(init_weights):
    model = _perturbed(init_weights=init_weights)
    layer = model.base_model.model.lin1
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.miss_block["default"].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)
    assert not layer.merged


def test_merge_and_unload_equals_hf_merged_model():
    ours, theirs = _pair(init_weights="bat", target_modules=["lin1"])
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "miss_block" in name:
                p.normal_(0, 0.3)
    theirs.load_state_dict(ours.state_dict())
    x = make_inputs("mlp")["x"]
    torch.testing.assert_close(run(ours.merge_and_unload(), {"x": x}), run(theirs.merge_and_unload(), {"x": x}),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=12, target_modules=["lin0"]), r"`r` \(12\) must be less than or equal to in_features \(10\)"),
    (dict(r=4, target_modules=["lin0"], init_weights="bat"), r"lin0.*divisible by `r` \(4\)"),
    (dict(r=4, target_modules=["lin2"], init_weights="mini", mini_r=3), r"lin2.*out_features \(4\) divisible by `mini_r` \(3\)"),
])
def test_layer_errors_name_the_module_and_field(kwargs, match):
    model = make_model("mlp")
    with pytest.raises(ConfigError, match=match):
        get_peft_model(model, MissConfig(**kwargs))
    assert not isinstance(model.lin0, PeftModel) and isinstance(model.lin0, nn.Linear), "injection is all-or-nothing"


def test_conv1d_is_not_wrapped_as_in_hf():
    with pytest.raises(TargetNotFoundError, match="c_fc"):
        get_peft_model(make_model("gpt2-conv1d"), MissConfig(r=4, target_modules=["c_fc"]))
    with pytest.raises(TypeError, match="only `torch.nn.Linear`"):
        peft.get_peft_model(make_model("gpt2-conv1d"), peft.MissConfig(r=4, target_modules=["c_fc"]))
