"""OFT-specific checks: config errors as HF PEFT's, block-size adjustment, the rotation itself,
Conv2d against HF's merged model, mixed batches against HF peft single-adapter runs, several
active adapters."""

import json
import tempfile

import pytest
import torch
from torch import nn

from peft_kernel import ConfigError, PeftModel, get_peft_model
from peft_kernel_testing import check_mixed_batch_against_hf, run
from peft_kernel_testing.hf_oracle import check_active_adapters_against_hf
from peft_kernel_testing.models import make_inputs, make_model
from peft_kernel_oft import OFTConfig
from peft_kernel_oft.rotation import OFTRotationModule
from peft_kernel_orthogonal.rotation import block_layout, cayley

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:Invalid .*Adjusted:UserWarning")


def _randomize(model, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "oft_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


# ---- config --------------------------------------------------------------------------------
def test_config_dict_is_hf_config_dict():
    ours = OFTConfig(target_modules=["q", "v"], oft_block_size=8).to_dict()
    hf = peft.OFTConfig(target_modules=["q", "v"], oft_block_size=8).to_dict()
    assert set(ours) == set(hf)
    for key in hf:
        if key not in ("target_modules", "peft_type", "task_type"):
            assert ours[key] == hf[key], key
    assert OFTConfig.from_dict(json.loads(json.dumps(ours))).oft_block_size == 8


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=4, oft_block_size=4), r"You can only specify either r \(4\) or oft_block_size \(4\)"),
    (dict(r=0, oft_block_size=0), "Either `r` or `oft_block_size` must be non-zero"),
    (dict(layers_pattern="layers"), "`layers_to_transform` must also be specified"),
])
def test_bad_configs_raise_like_hf(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        OFTConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        peft.OFTConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(module_dropout=1.5), "module_dropout"),
    (dict(bias="lora_only"), "bias"),
    (dict(r=-2, oft_block_size=0), "r and oft_block_size"),
])
def test_invalid_values_are_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        OFTConfig(**kwargs)


def test_bias_oft_only_trains_and_saves_the_adapted_layers_biases():
    from peft_kernel import get_peft_model_state_dict

    model = get_peft_model(make_model("mlp"), OFTConfig(target_modules=["lin1"], oft_block_size=4, bias="oft_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.lin1.base_layer.bias" in trainable
    assert "base_model.model.lin0.bias" not in trainable
    assert "base_model.model.lin1.base_layer.bias" in get_peft_model_state_dict(model)


def test_unsupported_layer_type_is_a_clear_error():
    with pytest.raises(ValueError, match="Conv1D"):
        get_peft_model(make_model("gpt2-conv1d"), OFTConfig(target_modules=["c_fc"], oft_block_size=2))


@pytest.mark.parametrize("n,r,b", [(16, 0, 6), (16, 3, 0), (16, 6, 0), (12, 0, 5), (36, 5, 0), (10, 0, 20), (10, 4, 0)])
def test_block_layout_adjusts_like_hf(n, r, b):
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(n, 3)

        def forward(self, x):
            return self.lin(x)

    with pytest.warns(UserWarning, match="Adjusted"):
        ours = get_peft_model(One(), OFTConfig(target_modules=["lin"], r=r, oft_block_size=b))
    hf = peft.get_peft_model(One(), peft.OFTConfig(target_modules=["lin"], r=r, oft_block_size=b))
    assert ours.base_model.model.lin.oft_R["default"].weight.shape == hf.base_model.model.lin.oft_R["default"].weight.shape
    with pytest.warns(UserWarning):
        rr, bb = block_layout(n, r, b)
    assert rr * bb == n


# ---- the rotation --------------------------------------------------------------------------
def test_exact_cayley_is_orthogonal_and_neumann_approximates_it():
    module = OFTRotationModule(3, 4, use_cayley_neumann=False)
    with torch.no_grad():
        module.weight.copy_(0.05 * torch.randn(3, 6))
    exact = module.blocks()
    torch.testing.assert_close(exact @ exact.transpose(1, 2), torch.eye(4).expand(3, 4, 4), atol=1e-6, rtol=0)
    q = module.skew()
    approx = cayley(q, True, 12)
    # the series approximates the inverse Cayley transform (I + Q)(I - Q)^-1 (HF's choice); both are rotations
    torch.testing.assert_close(approx, torch.linalg.solve(torch.eye(4) - q, torch.eye(4) + q, left=False), atol=1e-6, rtol=0)


def test_coft_projects_the_parameter_in_place_like_hf():
    kwargs = dict(target_modules=["lin1"], oft_block_size=4, coft=True, eps=0.1)
    ours = get_peft_model(make_model("mlp"), OFTConfig(**kwargs))
    hf = peft.get_peft_model(make_model("mlp"), peft.OFTConfig(**kwargs))
    _randomize(ours, 1, scale=1.0)
    _randomize(hf, 1, scale=1.0)
    inputs = make_inputs("mlp")
    torch.testing.assert_close(run(ours.eval(), inputs), run(hf.eval(), inputs), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.base_model.model.lin1.oft_R["default"].weight,
                               hf.base_model.model.lin1.oft_R["default"].weight, atol=1e-7, rtol=0)


def test_module_dropout_only_in_training():
    model = get_peft_model(make_model("mlp"), OFTConfig(target_modules=["lin1"], oft_block_size=2, module_dropout=0.5))
    _randomize(model, 2)
    inputs = make_inputs("mlp")
    model.eval()
    assert torch.equal(run(model, inputs), run(model, inputs))
    model.train()
    torch.manual_seed(0)
    outs = {tuple(run(model, inputs).flatten().tolist()) for _ in range(4)}
    assert len(outs) > 1


# ---- Conv2d: HF's merged model is the reference ---------------------------------------------
@pytest.mark.parametrize("direction", ["hf_to_ours", "ours_to_hf"])
def test_conv2d_matches_hf_merged_weights(direction):
    kwargs = dict(target_modules=["conv0", "conv1"], oft_block_size=3)
    inputs = make_inputs("conv2d")
    with tempfile.TemporaryDirectory() as tmp:
        if direction == "hf_to_ours":
            source = peft.get_peft_model(make_model("conv2d"), peft.OFTConfig(**kwargs))
            _randomize(source, 4)
            source.save_pretrained(tmp)
            ours = PeftModel.from_pretrained(make_model("conv2d"), tmp).eval()
            hf = source.eval()
        else:
            ours = get_peft_model(make_model("conv2d"), OFTConfig(**kwargs))
            _randomize(ours, 4)
            ours.save_pretrained(tmp)
            hf = peft.PeftModel.from_pretrained(make_model("conv2d"), tmp).eval()
            ours.eval()
        expected = run(hf.merge_and_unload(), inputs)
    torch.testing.assert_close(run(ours, inputs), expected, atol=1e-5, rtol=0)


# ---- mixed batches vs HF peft single-adapter runs -------------------------------------------
@pytest.mark.parametrize("kind,kwargs", [
    ("mlp", dict(target_modules=["lin0", "lin1"], oft_block_size=4)),
    ("embedding", dict(target_modules=["emb", "lin"], oft_block_size=2)),
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], oft_block_size=4)),
])
def test_mixed_batch_rows_equal_hf_single_adapter_runs(kind, kwargs):
    """HF peft ignores adapter_names for this method; ours honours it."""
    check_mixed_batch_against_hf(kind, lambda: peft.OFTConfig(**kwargs), randomize=_randomize)


@pytest.mark.parametrize("kind,first,second", [
    ("mlp", dict(target_modules=["lin0", "lin1"], oft_block_size=4), dict(target_modules=["lin1"], oft_block_size=8)),
    ("conv2d", dict(target_modules=["conv0", "conv1"], oft_block_size=3), dict(target_modules=["conv1"], r=6, oft_block_size=0)),
])
def test_mixed_batch_with_different_block_sizes_and_targets(kind, first, second):
    model = get_peft_model(make_model(kind), OFTConfig(**first), adapter_name="first")
    model.add_adapter("second", OFTConfig(**second))
    _randomize(model, 5)
    model.eval()
    inputs = make_inputs(kind)
    singles = {}
    for name in ("first", "second"):
        model.set_adapter(name)
        singles[name] = run(model, inputs)
    with model.disable_adapter():
        singles["__base__"] = run(model, inputs)
    names = ["second", "first", "__base__", "second"]
    mixed = run(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-5, rtol=0)


# ---- several active adapters ---------------------------------------------------------------
@pytest.mark.parametrize("kind,kwargs", [
    ("mlp", dict(target_modules=["lin0", "lin1"], oft_block_size=4)),
    ("embedding", dict(target_modules=["emb"], oft_block_size=4)),
])
def test_several_active_adapters_compose_like_hf_and_merge_consistently(kind, kwargs):
    check_active_adapters_against_hf(kind, lambda: peft.OFTConfig(**kwargs), lambda: OFTConfig(**kwargs),
                                     randomize=_randomize, merge_tolerance=1e-4)


def test_safe_merge_refuses_non_finite_rotations():
    model = get_peft_model(make_model("mlp"), OFTConfig(target_modules=["lin1"], oft_block_size=4))
    before = model.base_model.model.lin1.base_layer.weight.detach().clone()
    with torch.no_grad():
        model.base_model.model.lin1.oft_R["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model.lin1.base_layer.weight, before)


def test_exports():
    import peft_kernel

    assert peft_kernel.OFTConfig is OFTConfig
    model = get_peft_model(make_model("mlp"), OFTConfig(target_modules=["lin1"], oft_block_size=4))
    assert type(model.base_model).__name__ == "OFTModel"
    assert isinstance(model.base_model.model.lin1, peft_kernel.OFTLayer)
    assert isinstance(model.base_model.model.lin1.oft_R["default"], peft_kernel.OFTRotationModule)
