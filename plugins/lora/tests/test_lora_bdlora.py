"""BD-LoRA (``use_bdlora``): conformance against HF PEFT (cross-loading, merge, mixed batches), the
block-diagonal factors (stored shapes, dense form, initialisation), and refused configurations."""

import pytest
import torch
from torch import nn

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_lora import LoraConfig
from peft_kernel_lora.bdlora_config import BdLoraConfig


def bdlora(bd_a, bd_b, nblocks=2, **kwargs):
    return lambda: LoraConfig(**{"r": 4, "lora_alpha": 8, **kwargs},
                              use_bdlora=BdLoraConfig(target_modules_bd_a=bd_a, target_modules_bd_b=bd_b, nblocks=nblocks))


CASES = [
    ConformanceCase("mlp", bdlora(["lin1"], ["lin2"], target_modules=["lin1", "lin2"]), id="mlp-bdlora"),
    ConformanceCase("mlp", bdlora(["lin1"], None, nblocks=4, target_modules=["lin1"], lora_bias=True, use_rslora=True),
                    id="mlp-bdlora-4blocks-bias"),
    ConformanceCase("mlp", bdlora(None, ["lin1", "lin2"], nblocks=4, target_modules=["lin1", "lin2"],
                                  init_lora_weights="gaussian"), id="mlp-bdlora-b-gaussian"),
    ConformanceCase("mlp", lambda: LoraConfig(r=4, target_modules=["lin0", "lin1", "lin2"], use_bdlora=BdLoraConfig(
        target_modules_bd_a=["lin1"], nblocks=2, match_strict=False)), id="mlp-bdlora-not-strict"),
    ConformanceCase("llama", bdlora(["q_proj", "k_proj", "v_proj", "up_proj", "gate_proj"], ["o_proj", "down_proj"],
                                    target_modules="all-linear"), id="llama-bdlora"),
]

TestBdLoraConformance = conformance_suite(CASES)

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)
        self.emb, self.conv = nn.Embedding(6, 8), nn.Conv1d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _model() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def _config(lib, init=True, nblocks=4, **kwargs):
    bd = {"target_modules_bd_a": ["up"], "target_modules_bd_b": ["down"], "nblocks": nblocks, **kwargs.pop("bd", {})}
    return lib.LoraConfig(**{"target_modules": ["up", "down"], "r": 16, "init_lora_weights": init, **kwargs},
                          use_bdlora=lib.BdLoraConfig(**bd))


def _ours(**kwargs):
    import peft_kernel

    return peft_kernel.get_peft_model(_model(), _config(peft_kernel, **kwargs))


def test_exported_as_peft_kernel_bdlora_config():
    import peft_kernel

    assert peft_kernel.BdLoraConfig is BdLoraConfig
    saved = LoraConfig(use_bdlora=BdLoraConfig(target_modules_bd_a=["q"], nblocks=2)).to_dict()["use_bdlora"]
    assert saved == {"target_modules_bd_a": ["q"], "target_modules_bd_b": None, "nblocks": 2, "match_strict": True}


def test_stored_shapes_equal_hf():
    ours = peft_kernel_state(_ours())
    theirs = {k: v.shape for k, v in peft.get_peft_model_state_dict(peft.get_peft_model(_model(), _config(peft))).items()}
    assert {k: v.shape for k, v in ours.items()} == theirs
    assert theirs["base_model.model.up.lora_A.weight"] == (16, 16)  # [r, in / nblocks]
    assert theirs["base_model.model.down.lora_B.weight"] == (64, 4)  # [out, r / nblocks]


def peft_kernel_state(model):
    import peft_kernel

    return peft_kernel.get_peft_model_state_dict(model)


def test_block_diagonal_factor_is_its_dense_form():
    layer = _ours(init=False).base_model.model.up
    factor = layer.lora_A["default"]
    dense = factor.dense()
    blocks = factor.weight.view(4, 4, 16)
    assert torch.equal(dense, torch.block_diag(*blocks))
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(factor(x), x @ dense.T)
    expected = layer.base_layer(x) + layer.scaling["default"] * (x @ dense.T) @ layer.lora_B["default"].weight.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_delta_weight_is_dense_b_times_dense_a():
    """HF PEFT 0.21.2's ``get_delta_weight`` multiplies the stored blocks as if dense ([128, 16] for
    ``up`` here, a shape error for ``down``); its merge is right. Ours equals ``B_dense @ A_dense``."""
    model = _ours(init=False)
    for name in ("up", "down"):
        layer = getattr(model.base_model.model, name)
        with torch.no_grad():
            for p in layer.lora_B["default"].parameters():
                p.normal_()
        dense_a, dense_b = (layer.lora_A["default"], layer.lora_B["default"])
        a = dense_a.dense() if hasattr(dense_a, "dense") else dense_a.weight
        b = dense_b.dense() if hasattr(dense_b, "dense") else dense_b.weight
        torch.testing.assert_close(layer.delta_weight("default"), layer.scaling["default"] * b @ a)


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_initialisation_matches_hf(init):
    """A block-diagonal A is Kaiming-uniform (gain √2) over a block's fan-in, a block-diagonal B zero
    for every ``init_lora_weights`` (HF's, observed); the plain factors follow ``init_lora_weights``."""
    ours = _ours(init=init).base_model.model
    theirs = peft.get_peft_model(_model(), _config(peft, init=init)).base_model.model
    for model in (ours, theirs):
        bd_a = model.up.lora_A["default"].weight
        assert bd_a.abs().max() <= (6 / 16) ** 0.5 and bd_a.abs().max() > 0.9 * (6 / 16) ** 0.5
        assert not model.down.lora_B["default"].weight.any()
    for ours_p, theirs_p in ((ours.up.lora_B, theirs.up.lora_B), (ours.down.lora_A, theirs.down.lora_A)):
        a, b = ours_p["default"].weight, theirs_p["default"].weight
        assert bool(a.any()) == bool(b.any())
        assert abs(a.std().item() - b.std().item()) < 0.2 * b.std().item() + 1e-8


@pytest.mark.parametrize("kwargs, match", [
    ({"bd": {"target_modules_bd_b": None}}, "Target down matches neither A nor B block-diagonal patterns"),
    ({"bd": {"target_modules_bd_a": ["up", "dow"]}}, "matches both target_modules_bd_a and target_modules_bd_b"),
    ({"r": 6}, "the rank 6 of module 'up' must be divisible by nblocks=4"),
    ({"nblocks": 3, "r": 6}, "in_features=64 and out_features=6 of a block-diagonal factor must both be divisible by nblocks=3"),
    ({"lora_bias": True}, "lora_bias=True is not supported with a block-diagonal lora_B"),
    ({"target_modules": ["emb"], "bd": {"target_modules_bd_a": ["emb"]}}, "only supported for nn.Linear layers, not Embedding"),
    ({"target_modules": ["conv"], "bd": {"target_modules_bd_a": ["conv"]}}, "only supported for nn.Linear layers, not Conv1d"),
])
def test_unsupported_layers_and_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _ours(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"use_bdlora": {"nblocks": 0}}, "BdLoraConfig.nblocks must be a positive integer"),
    ({"use_bdlora": {"target_modules_bd_a": "up"}}, "target_modules_bd_a must be a list"),
    ({"use_bdlora": {"target_modules_bd_a": ["up"], "target_modules_bd_b": ["up"]}}, "Found overlapping modules"),
    ({"use_bdlora": {"zz": 2}}, r"use_bdlora has unknown keys \['zz'\]"),
    ({"use_bdlora": True}, "must be a BdLoraConfig, a dict, or None"),
    ({"use_dora": True}, "cannot be combined with use_dora=True"),
    ({"fan_in_fan_out": True}, "cannot be combined with fan_in_fan_out=True"),
    ({"init_lora_weights": "olora"}, "cannot be combined with init_lora_weights='olora'"),
])
def test_bad_configs(kwargs, match):
    from peft_kernel.plugin_api import ConfigError

    with pytest.raises(ConfigError, match=match):
        LoraConfig(**{"use_bdlora": BdLoraConfig(nblocks=2), **kwargs})


def test_add_weighted_adapter_refused():
    with pytest.raises(ValueError, match="does not combine BD-LoRA adapters"):
        _ours().add_weighted_adapter(["default"], [1.0], "combined")
