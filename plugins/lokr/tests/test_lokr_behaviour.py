"""LoKr beyond the conformance suite: config parity and bad configs, the factorization rule,
HF-identical training-time dropout, exact gradients, parameter layout for every decomposition
choice, mixed batches (where HF ignores ``adapter_names``), hotswap, bf16."""

import pytest
import torch

import peft_kernel
from peft_kernel import ConfigError, TargetNotFoundError, get_peft_model
from peft_kernel_testing import make_model
from peft_kernel_lokr import LoKrConfig
from peft_kernel_lokr.layers import factorization
from peft_kernel_lycoris import testing as lt


def hf_config(**kwargs):
    return lt.hf_peft().LoKrConfig(**kwargs)


def test_config_keys_and_defaults_match_hf():
    lt.check_config_matches_hf(LoKrConfig, "LoKrConfig")


def test_importable_from_peft_kernel_and_listed(capsys):
    assert peft_kernel.LoKrConfig is LoKrConfig
    assert peft_kernel.LoKrModel.__name__ == "LoKrModel"
    lt.check_listed_by_cli(capsys, "peft-kernel-lokr", "LOKR")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "positive integer"),
        ({"rank_dropout": 2.0}, "rank_dropout"),
        ({"module_dropout": -0.5}, "module_dropout"),
        ({"init_weights": "gaussian"}, "init_weights"),
        ({"decompose_factor": 2.5}, "decompose_factor"),
        ({"rank_pattern": {"lin0": -1}}, "rank_pattern"),
        ({"layers_pattern": "layers"}, "layers_to_transform` must also be specified"),
        ({"target_modules": "lin.*", "layers_pattern": "layers", "layers_to_transform": [0]}, "when `target_modules` is a str"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoKrConfig(**{"target_modules": ["lin0"], **kwargs})


def test_bad_json_names_the_field():
    with pytest.raises(ConfigError, match=r"\$\.init_weights"):
        LoKrConfig.from_dict({"peft_type": "LOKR", "init_weights": "kaiming"})
    with pytest.raises(ConfigError, match=r"\$\.decompose_factor: expected int"):
        LoKrConfig.from_dict({"peft_type": "LOKR", "decompose_factor": "4"})
    assert LoKrConfig.from_dict({"peft_type": "LOKR", "init_weights": "lycoris"}).init_weights == "lycoris"


def test_unsupported_layer():
    with pytest.raises(TargetNotFoundError, match="Embedding"):
        get_peft_model(make_model("embedding"), LoKrConfig(target_modules=["emb"]))
    with pytest.raises(TargetNotFoundError, match="Conv3d"):
        get_peft_model(make_model("conv3d"), LoKrConfig(target_modules=["conv0"]))


def test_factorization_matches_hf():
    from peft.tuners.lokr.layer import factorization as hf_factorization  # the oracle's behaviour

    for dimension in range(1, 260):
        for factor in (-3, -1, 0, 1, 2, 3, 4, 5, 8, 16, 100):
            assert factorization(dimension, factor) == hf_factorization(dimension, factor), (dimension, factor)
    assert factorization(768) == (24, 32) and factorization(768, 8) == (8, 96) and factorization(10, 5) == (5, 2)


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("mlp", {"target_modules": ["lin0", "lin1", "lin2"], "rank_dropout": 0.5, "module_dropout": 0.3}),
        ("mlp", {"target_modules": ["lin0", "lin1"], "r": 1, "decompose_both": True, "rank_dropout": 0.5, "rank_dropout_scale": True}),
        ("conv2d", {"target_modules": ["conv0", "conv1"], "r": 1, "use_effective_conv2d": True, "rank_dropout": 0.4,
                    "module_dropout": 0.2, "rank_dropout_scale": True}),
        ("conv1d", {"target_modules": ["conv0", "conv1"], "rank_dropout": 0.4}),
    ],
)
def test_training_dropout_outputs_and_grads_match_hf(kind, kwargs):
    lt.check_training_matches_hf(hf_config(**{"alpha": 6, **kwargs}), kind)


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("mlp", {"r": 1, "decompose_both": True}),
        ("mlp", {"r": 2, "decompose_factor": 2}),
        ("mlp", {"r": 2, "decompose_factor": 0}),
        ("conv2d", {"r": 1, "use_effective_conv2d": True, "decompose_both": True}),
        ("conv2d", {"r": 4, "use_effective_conv2d": True}),
        ("conv1d", {"r": 1}),
        ("conv1d", {"r": 1, "use_effective_conv2d": True, "rank_pattern": {"conv0": 4}}),
    ],
)
def test_parameter_names_and_shapes_match_hf(kind, kwargs):
    targets = {"mlp": ["lin0", "lin1", "lin2"], "conv2d": ["conv0", "conv1", "lin"], "conv1d": ["conv0", "conv1"]}[kind]
    lt.check_parameters_match_hf(hf_config(target_modules=targets, **kwargs), LoKrConfig(target_modules=targets, **kwargs), kind)


@pytest.mark.parametrize(
    ("kind", "target", "kwargs"),
    [
        ("conv2d", "conv1", {"r": 1, "use_effective_conv2d": True, "decompose_both": True}),
        ("conv1d", "conv1", {"r": 4}),
        ("conv1d", "conv1", {"r": 1, "use_effective_conv2d": True}),
        ("mlp", "lin1", {"r": 1, "decompose_both": True}),
    ],
)
def test_gradients_are_exact(kind, target, kwargs):
    model = get_peft_model(make_model(kind), LoKrConfig(target_modules=[target], init_weights=False, **kwargs))
    lt.check_exact_gradients(model.base_model.model.get_submodule(target))


@pytest.mark.parametrize("init_weights", [True, "lycoris", False])
def test_identity_at_init(init_weights):
    config = LoKrConfig(target_modules=["conv0", "conv1", "lin"], r=1, decompose_both=True, use_effective_conv2d=True,
                        init_weights=init_weights)
    lt.check_identity_at_init(config, "conv2d")


def test_grouped_conv():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.grouped = torch.nn.Conv2d(4, 8, 3, groups=2, padding=1)

        def forward(self, x):
            return self.grouped(x)

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoKrConfig(r=1, target_modules=["grouped"], init_weights=False)).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        out = model(x)
        model.merge_adapter()
        assert (model(x) - out).abs().max() <= 1e-5


def test_mixed_batch_three_adapters():
    lt.check_mixed_batch_three_adapters(lambda: LoKrConfig(r=1, decompose_both=True, target_modules=["conv0", "conv1"]), "conv2d")


def test_mixed_batch_rows_get_their_own_adapter_unlike_hf():
    lt.check_hf_ignores_what_we_route(lambda: hf_config(r=2, target_modules=["lin0", "lin1"]),
                                      lambda: LoKrConfig(r=2, target_modules=["lin0", "lin1"]), "mlp")


def test_hotswap():
    lt.check_hotswap(lambda: LoKrConfig(r=1, target_modules=["lin0", "lin1"], decompose_both=True), "mlp")


def test_bf16_base():
    lt.check_half_precision_base(LoKrConfig(r=1, target_modules=["conv0", "conv1"], use_effective_conv2d=True), "conv2d")


def test_merge_in_training_is_reversible():
    lt.check_merge_in_training_is_reversible(LoKrConfig(r=2, target_modules=["lin0", "lin1"], rank_dropout=0.5), "mlp")


def test_two_active_adapters_and_safe_merge():
    lt.check_two_active_adapters_match_hf(lambda: hf_config(r=1, target_modules=["lin0", "lin1"], decompose_both=True),
                                          lambda: LoKrConfig(r=1, target_modules=["lin0", "lin1"], decompose_both=True), "mlp")
