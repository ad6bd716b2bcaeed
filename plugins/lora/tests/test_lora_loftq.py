"""LoftQ initialisation (``init_lora_weights="loftq"``) against HF PEFT.

HF PEFT 0.21.2 runs LoftQ only through bitsandbytes on CUDA. The oracle here runs it on CPU: a
torch function mode maps HF's hard-coded ``"cuda"`` device to the CPU, and bitsandbytes' CPU
``dequantize_4bit`` (which applies the first block's absmax to every block in bitsandbytes 0.50.2)
is replaced by a direct unpacking of bitsandbytes' own 4-bit codes and absmax. Quantisation codes,
the int8 path, the SVD and what HF writes into the layers stay HF's and bitsandbytes'.
"""

from __future__ import annotations

import copy
import json
import tempfile
from typing import Any, Iterator

import attrs
import pytest
import torch
from torch.overrides import TorchFunctionMode

import peft_kernel
from peft_kernel.plugin_api import ConfigError, UnsupportedFeatureError
from peft_kernel_lora import LoraConfig
from peft_kernel_lora.loftq import loftq_decompose
from peft_kernel_lora.loftq_config import LoftQConfig
from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_testing.models import make_inputs, make_model

peft = pytest.importorskip("peft")
pytest.importorskip("scipy", reason="HF PEFT's LoftQ config needs scipy")
bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="HF PEFT's LoftQ quantises with bitsandbytes")


def _cpu(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    return value


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*(_cpu(a) for a in args), **{k: _cpu(v) for k, v in (kwargs or {}).items()})


def _dequantize_4bit(packed: torch.Tensor, quant_state: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    """bitsandbytes' packed NF4 codes (two per byte, high nibble first) times their block's absmax."""
    flat = packed.flatten()
    codes = torch.stack([flat >> 4, flat & 15], 1).flatten().long()
    n = quant_state.shape.numel()
    absmax = quant_state.absmax.repeat_interleave(quant_state.blocksize)[:n]
    return (quant_state.code.cpu()[codes[:n]] * absmax).reshape(quant_state.shape).to(quant_state.dtype)


@pytest.fixture(autouse=True)
def hf_loftq_on_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(bnb_functional, "dequantize_4bit", _dequantize_4bit)
    with _CudaToCpu():
        yield


def lora(**kwargs: Any):
    loftq = kwargs.pop("loftq", {})
    return lambda: LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": "loftq",
                                 "loftq_config": LoftQConfig(**loftq), **kwargs})


CASES = [
    ConformanceCase("mlp", lora(target_modules=["lin0", "lin1", "lin2"]), id="mlp-nf4", changes_base_at_init=True),
    ConformanceCase("mlp", lora(target_modules=["lin0", "lin1"], loftq={"loftq_bits": 8, "loftq_iter": 2},
                                use_rslora=True), id="mlp-int8-iter2-rslora", changes_base_at_init=True),
    ConformanceCase("llama", lora(target_modules="all-linear", loftq={"loftq_iter": 2}), id="llama-nf4-iter2",
                    changes_base_at_init=True),
]

TestLoftQConformance = conformance_suite(CASES)


def _both(kind: str, bits: int, iters: int, **kwargs: Any) -> tuple[Any, Any]:
    options = {"r": 4, "lora_alpha": 8, "init_lora_weights": "loftq", **kwargs}
    ours = peft_kernel.get_peft_model(make_model(kind), peft_kernel.LoraConfig(
        **options, loftq_config=peft_kernel.LoftQConfig(loftq_bits=bits, loftq_iter=iters)))
    theirs = peft.get_peft_model(make_model(kind), peft.LoraConfig(
        **options, loftq_config=peft.LoftQConfig(loftq_bits=bits, loftq_iter=iters)))
    return ours, theirs


@pytest.mark.parametrize("kind,targets", [("mlp", ["lin0", "lin1", "lin2"]), ("llama", "all-linear")])
@pytest.mark.parametrize("bits,iters", [(4, 1), (4, 2), (8, 1), (8, 2)])
def test_base_and_adapter_tensors_equal_hf(kind: str, targets: Any, bits: int, iters: int) -> None:
    ours, theirs = _both(kind, bits, iters, target_modules=targets)
    mine, hf = ours.state_dict(), theirs.state_dict()
    assert set(mine) == set(hf)
    for key in hf:
        assert torch.equal(mine[key], hf[key]), key  # bit-exact, base weights and lora_A / lora_B
    original = make_model(kind).state_dict()
    for key in (k for k in mine if k.endswith("base_layer.weight")):  # LoftQ rewrote every targeted base weight
        assert not torch.equal(mine[key], original[key.removeprefix("base_model.model.").replace("base_layer.", "")])


def test_half_precision_base_equals_hf() -> None:
    """The base keeps its dtype; A / B are rounded through it before the float32 autocast (as HF)."""
    settings = {"loftq_bits": 4, "loftq_iter": 1}  # HF raises KeyError on a dict missing a key; ours fills defaults
    ours = peft_kernel.get_peft_model(make_model("mlp").to(torch.bfloat16), peft_kernel.LoraConfig(
        r=4, target_modules=["lin1"], init_lora_weights="loftq", loftq_config=settings))
    theirs = peft.get_peft_model(make_model("mlp").to(torch.bfloat16), peft.LoraConfig(
        r=4, target_modules=["lin1"], init_lora_weights="loftq", loftq_config=settings))
    for key, value in theirs.state_dict().items():
        assert value.dtype == ours.state_dict()[key].dtype and torch.equal(value, ours.state_dict()[key]), key


def test_base_weights_are_quantised_and_adapters_fit_the_residual() -> None:
    """Independent of HF: NF4 keeps <= 16 levels per block of 64; B·A is the best rank-r fit of W - Q."""
    base = make_model("mlp")
    model = peft_kernel.get_peft_model(copy.deepcopy(base), lora(target_modules=["lin1"])())
    layer = model.base_model.model.lin1
    quantised = layer.base_layer.weight.detach()
    for block in quantised.reshape(-1, 64):
        assert len(torch.unique(block)) <= 16
    residual = base.lin1.weight.detach() - quantised
    product = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    left, singular, right_h = torch.linalg.svd(residual)
    best = left[:, :4] @ torch.diag(singular[:4]) @ right_h[:4]
    assert torch.allclose(product, best, atol=1e-5)
    assert torch.equal(layer.base_layer.bias, base.lin1.bias)  # biases are not quantised


def test_conv1d_orients_the_adapter_like_the_layer() -> None:
    """transformers ``Conv1D``: HF quantises the stored [in, out] weight (ours: the same ``Q``) but
    then builds ``lora_A`` as [r, out], which cannot run; ours is [r, in] and fits ``Wᵀ - Qᵀ``."""
    base = make_model("gpt2-conv1d")
    config = lora(target_modules=["c_fc"], fan_in_fan_out=True)
    ours = peft_kernel.get_peft_model(copy.deepcopy(base), config())
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.get_peft_config(config().to_dict()))
    layer, hf_layer = ours.base_model.model.c_fc, theirs.base_model.model.c_fc
    assert torch.equal(layer.base_layer.weight, hf_layer.base_layer.weight)
    assert tuple(layer.lora_A["default"].weight.shape) == (4, 10)
    assert tuple(hf_layer.lora_A["default"].weight.shape) == (4, 16)  # HF's shape bug
    quantised, a, b = loftq_decompose(base.c_fc.weight.detach(), 4, 4, 1, transposed=True)
    assert torch.equal(quantised, layer.base_layer.weight)
    x = make_inputs("gpt2-conv1d")["x"]
    expected = base.c_proj(torch.relu(x @ quantised + base.c_fc.bias + 2.0 * (x @ a.T @ b.T)))
    assert torch.allclose(ours(x), expected, atol=1e-5)


def test_dora_magnitude_follows_the_quantised_base() -> None:
    ours, theirs = _both("mlp", 4, 1, target_modules=["lin1"], use_dora=True)
    layer, hf_layer = ours.base_model.model.lin1, theirs.base_model.model.lin1
    assert torch.equal(layer.base_layer.weight, hf_layer.base_layer.weight)
    assert torch.allclose(layer.lora_magnitude_vector["default"], hf_layer.lora_magnitude_vector["default"].weight,
                          atol=1e-6)
    x = make_inputs("mlp")["x"]
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


@pytest.mark.parametrize("direction", ["hf_to_ours", "ours_to_hf"])
def test_saved_adapter_cross_loads(direction: str) -> None:
    """The adapter loads onto the original float model; loading re-runs LoftQ on it (as HF does)."""
    config = lora(target_modules=["lin0", "lin2"], loftq={"loftq_bits": 8})
    inputs = make_inputs("mlp")
    with tempfile.TemporaryDirectory() as tmp:
        if direction == "hf_to_ours":
            source = peft.get_peft_model(make_model("mlp"), peft.get_peft_config(config().to_dict()))
        else:
            source = peft_kernel.get_peft_model(make_model("mlp"), config())
        with torch.no_grad():
            for name, param in source.named_parameters():
                if "lora_" in name:
                    param.add_(0.1 * torch.randn_like(param))
        expected = source.eval()(**inputs)
        source.save_pretrained(tmp)
        with open(f"{tmp}/adapter_config.json") as handle:
            saved = json.load(handle)
        assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 1}
        target = peft_kernel.PeftModel if direction == "hf_to_ours" else peft.PeftModel
        loaded = target.from_pretrained(make_model("mlp"), tmp).eval()
        assert torch.allclose(loaded(**inputs), expected, atol=1e-5)


def test_config_fields_defaults_and_export() -> None:
    import dataclasses

    assert peft_kernel.LoftQConfig is LoftQConfig
    assert [(f.name, f.default) for f in attrs.fields(LoftQConfig)] == [
        (f.name, f.default) for f in dataclasses.fields(peft.LoftQConfig)]
    assert LoftQConfig() == LoftQConfig(loftq_bits=4, loftq_iter=1)
    config = LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=8))
    assert config.loftq_config == {"loftq_bits": 8, "loftq_iter": 1}  # stored as a dict, as HF
    assert config.to_dict()["loftq_config"] == peft.LoraConfig(
        init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=8)).to_dict()["loftq_config"]
    assert LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 3}).loftq_config["loftq_bits"] == 4
    assert LoraConfig().loftq_config == {}


@pytest.mark.parametrize("kwargs,match", [
    ({"loftq_bits": 2}, "loftq_bits"), ({"loftq_bits": 3}, "loftq_bits"), ({"loftq_bits": True}, "loftq_bits"),
    ({"loftq_iter": 0}, "loftq_iter"), ({"loftq_iter": 1.5}, "loftq_iter"),
])
def test_bad_loftq_config_names_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LoftQConfig(**kwargs)
    with pytest.raises(ConfigError, match=match):
        LoraConfig(init_lora_weights="loftq", loftq_config=kwargs)


def test_bad_lora_configs_with_loftq() -> None:
    with pytest.raises(ConfigError, match="`loftq_config` must be specified"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ConfigError, match="unknown keys"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bit": 4})
    with pytest.raises(ConfigError, match="lora_bias"):
        LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(), lora_bias=True)
    with pytest.raises(TypeError):
        LoftQConfig(loftq_bitz=4)
    with pytest.warns(UserWarning, match="will be ignored"):
        LoraConfig(loftq_config=LoftQConfig())


@pytest.mark.parametrize("kind,targets,match", [
    ("embedding", ["emb"], "Linear and Conv1D"), ("conv2d", ["conv0"], "Linear and Conv1D"),
    ("mlp", ["lin0", "lin2"], "exceeds"),  # lin0 is quantised first, then restored when lin2 fails
])
def test_unsupported_layers_refused_and_base_restored(kind: str, targets: list, match: str) -> None:
    model = make_model(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = 8 if kind == "mlp" else 2
    with pytest.raises((UnsupportedFeatureError, ValueError), match=match):
        peft_kernel.get_peft_model(model, lora(target_modules=targets, r=r)())
    after = model.state_dict()
    assert all(torch.equal(before[k], after.get(k, before[k])) for k in before)


def test_replace_lora_weights_loftq_refuses_without_bitsandbytes_layers() -> None:
    model = peft_kernel.get_peft_model(make_model("mlp"), LoraConfig(r=2, target_modules=["lin0"]))
    with pytest.raises(UnsupportedFeatureError, match="bitsandbytes"):
        peft_kernel.replace_lora_weights_loftq(model)
