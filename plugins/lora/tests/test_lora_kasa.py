"""KaSA (``kasa_config``): conformance against HF PEFT (cross-loading, merge, mixed batches), the
base-weight truncation, the regularisation loss, and refused configurations."""

import pytest
import torch
from torch import nn

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_lora import LoraConfig
from peft_kernel_lora.kasa_config import KasaConfig


def kasa(**kwargs):
    return lambda: LoraConfig(**{"r": 4, "lora_alpha": 8, "kasa_config": KasaConfig(), **kwargs})


CASES = [
    ConformanceCase("mlp", kasa(target_modules=["lin0", "lin1"]), id="mlp-kasa", changes_base_at_init=True),
    ConformanceCase("mlp", kasa(target_modules=["lin0", "lin1", "lin2"], r=2, lora_bias=True, use_rslora=True,
                                kasa_config=KasaConfig(beta=0.1, gamma=0.2)),
                    id="mlp-kasa-bias-rslora", changes_base_at_init=True),
    ConformanceCase("mlp", kasa(target_modules=["lin1"], init_lora_weights="gaussian"), id="mlp-kasa-gaussian",
                    changes_base_at_init=True),
    ConformanceCase("llama", kasa(target_modules=["q_proj", "v_proj", "down_proj"]), id="llama-kasa",
                    changes_base_at_init=True),
]

TestKasaConformance = conformance_suite(CASES)

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 12), nn.Linear(12, 6)
        self.emb, self.conv = nn.Embedding(5, 10), nn.Conv1d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _model() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def _ours(**kwargs):
    import peft_kernel

    config = LoraConfig(**{"target_modules": ["lin0", "lin1"], "r": 4, "init_lora_weights": False,
                           "kasa_config": KasaConfig(beta=0.1, gamma=0.2), **kwargs})
    return peft_kernel.get_peft_model(_model(), config)


def test_exported_as_peft_kernel_kasa_config():
    import peft_kernel

    assert peft_kernel.KasaConfig is KasaConfig
    assert LoraConfig(kasa_config={"beta": 0.5}).to_dict()["kasa_config"] == {"beta": 0.5, "gamma": 1e-3}


def test_base_weight_loses_its_r_smallest_singular_components():
    original = _model().lin0.weight.detach()
    model = _ours()
    left, singular, right_h = torch.linalg.svd(original)
    expected = (left[:, :6] * singular[:6]) @ right_h[:6]
    torch.testing.assert_close(model.base_model.model.lin0.base_layer.weight.detach(), expected, atol=1e-6, rtol=0)
    assert torch.linalg.matrix_rank(model.base_model.model.lin0.base_layer.weight.detach()) == 6


def test_forward_is_b_diag_a():
    layer = _ours().base_model.model.lin0
    x = torch.randn(3, 10)
    a, b, d = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_diag["default"]
    expected = layer.base_layer(x) + layer.scaling["default"] * ((x @ a.T) * d) @ b.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_kasa_loss_equals_hf_and_formula():
    ours = _ours()
    ours.add_adapter("b", LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False, kasa_config=KasaConfig(beta=0.3, gamma=0.5)))
    hf = peft.get_peft_model(_model(), peft.LoraConfig(target_modules=["lin0", "lin1"], r=4, init_lora_weights=False,
                                                       kasa_config=peft.KasaConfig(beta=0.1, gamma=0.2)))
    hf.add_adapter("b", peft.LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False, kasa_config=peft.KasaConfig(beta=0.3, gamma=0.5)))
    hf.load_state_dict(ours.state_dict())
    for names in (None, "b", ["default", "b"], "missing"):
        theirs, mine = hf.base_model._get_kasa_loss(names), ours.base_model._get_kasa_loss(names)
        assert abs(float(torch.as_tensor(theirs).detach()) - float(torch.as_tensor(mine).detach())) < 1e-5, names
    layer = ours.base_model.model.lin0
    a, b, d = layer.lora_A["b"].weight, layer.lora_B["b"].weight, layer.lora_diag["b"]
    expected = 0.3 * (d ** 2).sum() + 0.5 * (torch.linalg.norm(b.T @ b - torch.eye(2)) + torch.linalg.norm(a @ a.T - torch.eye(2)))
    torch.testing.assert_close(ours.base_model._get_kasa_loss("b"), expected)
    ours.base_model._get_kasa_loss().backward()  # differentiable through A, B and lora_diag
    assert ours.base_model.model.lin0.lora_diag["default"].grad is not None


def test_kasa_and_plain_lora_adapters_do_not_mix():
    model = _ours()
    with pytest.raises(ValueError, match="KaSA cannot be combined with adapters that don't use KaSA"):
        model.add_adapter("plain", LoraConfig(target_modules=["lin0"], r=2))
    import peft_kernel

    plain = peft_kernel.get_peft_model(_model(), LoraConfig(target_modules=["lin0"], r=2))
    with pytest.raises(ValueError, match="new adapter uses KaSA but adapter 'default' does not"):
        plain.add_adapter("k", LoraConfig(target_modules=["lin1"], r=2, kasa_config=KasaConfig()))


@pytest.mark.parametrize("kwargs, match", [
    ({"target_modules": ["emb"]}, "only supported for nn.Linear layers, not Embedding"),
    ({"target_modules": ["conv"]}, "only supported for nn.Linear layers, not Conv1d"),
    ({"r": 10}, r"KaSA requires `r` \(10\) to be smaller than min\(in_features, out_features\) \(10\)"),
])
def test_unsupported_layers_and_ranks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _ours(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"kasa_config": {"beta": -1.0}}, "KasaConfig.beta must be non-negative"),
    ({"kasa_config": {"gamma": "a"}}, "KasaConfig.gamma must be a number"),
    ({"kasa_config": {"zzz": 1}}, r"kasa_config has unknown keys \['zzz'\]"),
    ({"kasa_config": 3}, "must be a KasaConfig, a dict, or None"),
    ({"use_dora": True}, "cannot be combined with use_dora=True"),
    ({"fan_in_fan_out": True}, "cannot be combined with fan_in_fan_out=True"),
    ({"init_lora_weights": "pissa"}, "cannot be combined with init_lora_weights='pissa'"),
    ({"use_bdlora": {"target_modules_bd_a": ["lin0"]}}, "cannot be combined with use_bdlora"),
])
def test_bad_configs(kwargs, match):
    from peft_kernel.plugin_api import ConfigError

    with pytest.raises(ConfigError, match=match):
        LoraConfig(**{"kasa_config": KasaConfig(), **kwargs})


def test_add_weighted_adapter_refused():
    model = _ours()
    with pytest.raises(ValueError, match="does not combine KaSA adapters"):
        model.add_weighted_adapter(["default"], [1.0], "combined")


def test_convert_to_lora_refused_as_hf():
    import peft_kernel

    with pytest.raises(TypeError, match="do not support LoRA conversion: KaSA adapters"):
        peft_kernel.convert_to_lora(_ours(), 2)
