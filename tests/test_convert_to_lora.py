"""``convert_to_lora`` / ``save_as_lora`` against HF PEFT 0.21's: the same tensors and config for
LoHa, LoKr and LoRA (also on GPT-2 ``Conv1D``), the same refusals for IA3 / OFT, and converted
adapters that load in both libraries and reproduce the original adapter up to the reported error."""

from __future__ import annotations

import warnings

import pytest
import torch

import peft_kernel as pk
from peft_kernel_testing import make_inputs, make_model
from peft_kernel_testing.hf_oracle import hf_oracle

peft = pytest.importorskip("peft")


def _hf_and_ours(tmp_path, kind: str, config_name: str, **kwargs):
    """An HF PEFT model with a trained-looking adapter, and ours loaded from its checkpoint."""
    with hf_oracle():
        hf = peft.get_peft_model(make_model(kind), getattr(peft, config_name)(**kwargs))
        with torch.no_grad():  # LoRA's B starts at zero: give every adapter tensor values
            for _, param in hf.named_parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.3)
        hf.save_pretrained(tmp_path / "orig")
    ours = pk.PeftModel.from_pretrained(make_model(kind), tmp_path / "orig")
    return hf, ours


def _config_fields(config) -> dict:
    data = config.to_dict()
    return {k: (sorted(v) if isinstance(v, (set, list)) else v) for k, v in data.items()
            if k in ("r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
                     "modules_to_save", "layers_to_transform", "layers_pattern", "base_model_name_or_path")}


CASES = {
    "loha": ("mlp", "LoHaConfig", dict(target_modules=["lin0", "lin1"], r=4, init_weights=False)),
    "lokr": ("mlp", "LoKrConfig", dict(target_modules=["lin0", "lin1"], r=4, init_weights=False)),
    "lora-conv1d": ("gpt2-conv1d", "LoraConfig", dict(target_modules=["c_fc", "c_proj"], r=4)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rank", [3, 0.9])
def test_conversion_equals_hf(tmp_path, case, rank):
    kind, config_name, kwargs = CASES[case]
    hf, ours = _hf_and_ours(tmp_path, kind, config_name, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # converting a LoRA warns, in both libraries
        with hf_oracle():
            hf_config, hf_state = peft.convert_to_lora(hf, rank)
        our_config, our_state = pk.convert_to_lora(ours, rank)
    assert sorted(our_state) == sorted(hf_state)
    for key in hf_state:
        torch.testing.assert_close(our_state[key], hf_state[key], rtol=0, atol=1e-6)
    assert _config_fields(our_config) == _config_fields(hf_config)
    assert isinstance(our_config, pk.LoraConfig)


def test_save_as_lora_loads_in_hf_and_ours_with_the_reported_error(tmp_path):
    _, ours = _hf_and_ours(tmp_path, "mlp", CASES["loha"][1], **CASES["loha"][2])
    inputs = make_inputs("mlp")
    pk.save_as_lora(tmp_path / "lora", ours, rank=10)
    with pytest.raises(ValueError, match="larger than the weight shape"):
        pk.convert_to_lora(ours, 11)  # lin0 is 10 -> 16
    _, state, errors = pk.convert_to_lora_with_errors(ours, 10)
    assert errors["lin0"] < 1e-5  # rank 10 is lin0's full rank
    # lin1 (16 x 16) at rank 10 is approximate: the reported error is what the SVD left out
    delta = ours.base_model.model.lin1.delta_weight("default").detach()
    approx = state["base_model.model.lin1.lora_B.weight"] @ state["base_model.model.lin1.lora_A.weight"]
    assert abs(float((delta - approx).norm() / delta.norm()) - errors["lin1"]) < 1e-4
    assert 0 < errors["lin1"] < 1
    ours_lora = pk.PeftModel.from_pretrained(make_model("mlp"), tmp_path / "lora")
    with hf_oracle():
        hf_out = peft.PeftModel.from_pretrained(make_model("mlp"), tmp_path / "lora")(**inputs)
    torch.testing.assert_close(ours_lora(**inputs), hf_out, rtol=0, atol=1e-6)


def test_full_rank_conversion_reproduces_the_adapter(tmp_path):
    """At full rank the LoRA is the adapter: outputs equal in both libraries, errors ~0."""
    _, ours = _hf_and_ours(tmp_path, "mlp", "LoKrConfig", target_modules=["lin1"], r=4, init_weights=False)
    inputs = make_inputs("mlp")
    expected = ours(**inputs)
    _, _, errors = pk.convert_to_lora_with_errors(ours, 16, progressbar=True)
    assert errors["lin1"] < 1e-5
    pk.save_as_lora(tmp_path / "lora", ours, rank=16)
    torch.testing.assert_close(pk.PeftModel.from_pretrained(make_model("mlp"), tmp_path / "lora")(**inputs),
                               expected, rtol=0, atol=1e-5)
    with hf_oracle():
        hf_lora = peft.PeftModel.from_pretrained(make_model("mlp"), tmp_path / "lora")
        torch.testing.assert_close(hf_lora(**inputs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("config_name, kwargs", [
    ("IA3Config", dict(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])),
    ("OFTConfig", dict(target_modules=["lin0", "lin1"], r=2, oft_block_size=0)),
])
def test_non_additive_methods_are_refused_as_hf(tmp_path, config_name, kwargs):
    hf, ours = _hf_and_ours(tmp_path, "mlp", config_name, **kwargs)
    with hf_oracle(), pytest.raises(TypeError, match="do not support LoRA conversion"):
        peft.convert_to_lora(hf, 2)
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        pk.convert_to_lora(ours, 2)


def test_bad_ranks_are_refused(tmp_path):
    _, ours = _hf_and_ours(tmp_path, "mlp", CASES["loha"][1], **CASES["loha"][2])
    for rank, error in ((0, ValueError), (1.5, ValueError), (0.0, ValueError), ("4", TypeError), (True, TypeError)):
        with pytest.raises(error):
            pk.convert_to_lora(ours, rank)
    with pytest.raises(TypeError, match="Could not detect"):
        pk.convert_to_lora(ours, 2, adapter_name="other")


def test_signatures_match_hf():
    import inspect

    for name in ("convert_to_lora", "save_as_lora"):
        theirs = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(peft, name)).parameters.values()]
        ours = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(pk, name)).parameters.values()]
        assert ours == theirs, name


def test_injected_model_equals_hf_and_progressbar_shows(capsys):
    with hf_oracle():
        hf = peft.inject_adapter_in_model(peft.LoHaConfig(target_modules=["lin0", "lin1"], init_weights=False),
                                          make_model("mlp"))
        hf_config, hf_state = peft.convert_to_lora(hf, 2)
    ours = pk.inject_adapter_in_model(pk.LoHaConfig(target_modules=["lin0", "lin1"], init_weights=False),
                                      make_model("mlp"))
    with torch.no_grad():  # the same adapter tensors as HF's (keys without the adapter name)
        for name, param in ours.named_parameters():
            if "hada_" in name:
                param.copy_(dict(hf.named_parameters())[name])
    our_config, our_state = pk.convert_to_lora(ours, 2, progressbar=True)
    assert "Converting to LoRA" in capsys.readouterr().err
    assert sorted(our_state) == sorted(hf_state) == ["lin0.lora_A.weight", "lin0.lora_B.weight",
                                                     "lin1.lora_A.weight", "lin1.lora_B.weight"]
    for key in hf_state:
        torch.testing.assert_close(our_state[key], hf_state[key], rtol=0, atol=1e-6)
    assert _config_fields(our_config) == _config_fields(hf_config)


def test_dora_converts_with_its_magnitude(tmp_path):
    """Beyond HF (which converts only DoRA's s·BA): the true weight change, so at full rank the LoRA
    reproduces the DoRA adapter."""
    model = pk.get_peft_model(make_model("mlp"), pk.LoraConfig(target_modules=["lin0"], r=2, use_dora=True,
                                                               init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.lin0.lora_magnitude_vector["default"].mul_(1.3)
    inputs = make_inputs("mlp")
    expected = model(**inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pk.save_as_lora(tmp_path / "lora", model, rank=10)
    loaded = pk.PeftModel.from_pretrained(make_model("mlp"), tmp_path / "lora")
    torch.testing.assert_close(loaded(**inputs), expected, rtol=0, atol=1e-5)
