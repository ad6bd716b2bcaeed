"""LoHa beyond the conformance suite: config parity and bad configs, HF-identical training-time
dropout, exact gradients, parameter layout, mixed batches (where HF ignores ``adapter_names``), hotswap, bf16."""

import pytest
import torch

import peft_kernel
from peft_kernel import ConfigError, TargetNotFoundError, get_peft_model
from peft_kernel_testing import make_model
from peft_kernel_loha import LoHaConfig
from peft_kernel_lycoris import testing as lt


def hf_config(**kwargs):
    return lt.hf_peft().LoHaConfig(**kwargs)


def test_config_keys_and_defaults_match_hf():
    lt.check_config_matches_hf(LoHaConfig, "LoHaConfig")


def test_importable_from_peft_kernel_and_listed(capsys):
    assert peft_kernel.LoHaConfig is LoHaConfig
    assert peft_kernel.LoHaModel.__name__ == "LoHaModel"
    lt.check_listed_by_cli(capsys, "peft-kernel-loha", "LOHA")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "positive integer"),
        ({"r": -2}, "positive integer"),
        ({"rank_dropout": 1.5}, "rank_dropout"),
        ({"module_dropout": -0.1}, "module_dropout"),
        ({"init_weights": "lycoris"}, "init_weights"),
        ({"rank_pattern": {"lin0": 0}}, "rank_pattern"),
        ({"layers_pattern": "layers"}, "layers_to_transform` must also be specified"),
        ({"target_modules": "lin.*", "layers_to_transform": [0]}, "cannot be used when `target_modules` is a str"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoHaConfig(**{"target_modules": ["lin0"], **kwargs})


def test_bad_json_names_the_field():
    with pytest.raises(ConfigError, match=r"\$\.r: expected int"):
        LoHaConfig.from_dict({"peft_type": "LOHA", "r": "8"})
    with pytest.raises(ConfigError, match=r"\$\.use_effective_conv2d"):
        LoHaConfig.from_dict({"peft_type": "LOHA", "use_effective_conv2d": "yes"})


def test_unsupported_layer_and_missing_target():
    with pytest.raises(TargetNotFoundError, match="Embedding"):
        get_peft_model(make_model("embedding"), LoHaConfig(target_modules=["emb"]))
    with pytest.raises(TargetNotFoundError, match="not found"):
        get_peft_model(make_model("mlp"), LoHaConfig(target_modules=["nothere"]))
    with pytest.raises(TargetNotFoundError):
        get_peft_model(make_model("mlp"), LoHaConfig(target_modules=["lin0"], exclude_modules=["lin0"]))


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("mlp", {"target_modules": ["lin0", "lin1"], "rank_dropout": 0.5, "module_dropout": 0.3}),
        ("conv2d", {"target_modules": ["conv0", "conv1", "lin"], "rank_dropout": 0.4, "use_effective_conv2d": True}),
        ("conv1d", {"target_modules": ["conv0", "conv1"], "rank_dropout": 0.4, "module_dropout": 0.5}),
    ],
)
def test_training_dropout_outputs_and_grads_match_hf(kind, kwargs):
    # HF PEFT 0.21.2's hand-written backward of the Tucker (use_effective_conv2d) product returns
    # wrong gradients for hada_w1_a / hada_w2_a; ours are autograd's (checked exactly below).
    wrong = ("hada_w1_a", "hada_w2_a") if kwargs.get("use_effective_conv2d") else ()
    lt.check_training_matches_hf(hf_config(r=4, alpha=6, **kwargs), kind, hf_wrong_grads=wrong)


@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "mlp"])
def test_gradients_are_exact(kind):
    targets = {"conv2d": ["conv0"], "conv1d": ["conv1"], "mlp": ["lin1"]}[kind]
    model = get_peft_model(make_model(kind), LoHaConfig(r=2, target_modules=targets, use_effective_conv2d=True, init_weights=False))
    lt.check_exact_gradients(model.base_model.model.get_submodule(targets[0]))


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("conv2d", {"target_modules": ["conv0", "conv1", "lin"], "use_effective_conv2d": True, "rank_pattern": {"conv1": 2}}),
        ("conv1d", {"target_modules": ["conv0", "conv1"], "use_effective_conv2d": True}),
    ],
)
def test_parameter_names_and_shapes_match_hf(kind, kwargs):
    lt.check_parameters_match_hf(hf_config(r=3, **kwargs), LoHaConfig(r=3, **kwargs), kind)


def test_grouped_conv_and_one_by_one_kernel():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.grouped = torch.nn.Conv2d(4, 8, 3, groups=2, padding=1)
            self.point = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.point(self.grouped(x))

    config = LoHaConfig(r=2, target_modules=["grouped", "point"], use_effective_conv2d=True, init_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(Net(), config).eval()
    assert "hada_t1" not in dict(model.base_model.model.point.named_parameters())  # 1x1: no Tucker core
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        out = model(x)
        model.merge_adapter()
        assert (model(x) - out).abs().max() <= 1e-5


@pytest.mark.parametrize("init_weights", [True, False])
def test_identity_at_init(init_weights):
    lt.check_identity_at_init(LoHaConfig(target_modules=["conv0", "conv1"], use_effective_conv2d=True, init_weights=init_weights), "conv2d")


def test_mixed_batch_three_adapters():
    lt.check_mixed_batch_three_adapters(lambda: LoHaConfig(r=2, target_modules=["lin0", "lin1"]), "mlp")


def test_mixed_batch_rows_get_their_own_adapter_unlike_hf():
    lt.check_hf_ignores_what_we_route(lambda: hf_config(r=2, target_modules=["lin0", "lin1"]),
                                      lambda: LoHaConfig(r=2, target_modules=["lin0", "lin1"]), "mlp")


def test_hotswap():
    lt.check_hotswap(lambda: LoHaConfig(r=2, target_modules=["conv0", "conv1"], use_effective_conv2d=True), "conv2d")


def test_bf16_base():
    lt.check_half_precision_base(LoHaConfig(r=2, target_modules=["lin0", "lin1"]), "mlp")


def test_merge_in_training_is_reversible():
    lt.check_merge_in_training_is_reversible(LoHaConfig(r=2, target_modules=["lin0", "lin1"], rank_dropout=0.5), "mlp")


def test_two_active_adapters_and_safe_merge():
    lt.check_two_active_adapters_match_hf(lambda: hf_config(r=2, target_modules=["conv0", "lin"], use_effective_conv2d=True),
                                          lambda: LoHaConfig(r=2, target_modules=["conv0", "lin"], use_effective_conv2d=True),
                                          "conv2d")
