"""ScaleShift behaviour beyond the conformance suite: the formula, stacking, merging into a
bias-free layer, config I/O and the legacy-key converter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peft_kernel import PeftConfig, PeftModel, get_peft_model
from peft_kernel.errors import ConfigError, TargetNotFoundError
from peft_kernel.plugins import get_registry
from peft_kernel_testing import make_inputs, make_model
from peft_kernel_scaleshift import ScaleShiftConfig
from peft_kernel_scaleshift.layers import ScaleShiftLinear


def _randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_plugin_is_installed():
    status = {p.name: p for p in get_registry().plugins}
    assert "scaleshift" in status, "install the example: pip install -e examples/peft-kernel-scaleshift"
    assert status["scaleshift"].status == "loaded", status["scaleshift"].error
    record = get_registry().method("SCALESHIFT")
    assert record.prefix == "ss_" and record.distribution == "peft-kernel-scaleshift"


def test_default_targets_and_exports():
    import peft_kernel

    model = get_peft_model(make_model("llama"), ScaleShiftConfig())  # target_modules=None: the record's default
    assert model.peft_config["default"].target_modules == {"down_proj"}
    assert type(model.base_model).__name__ == "ScaleShiftModel"
    assert peft_kernel.ScaleShiftConfig is ScaleShiftConfig and peft_kernel.ScaleShiftLinear is ScaleShiftLinear


def test_formula_and_identity_init():
    base = make_model("mlp")
    x = make_inputs("mlp")["x"]
    model = get_peft_model(make_model("mlp"), ScaleShiftConfig(target_modules=["lin2"])).eval()
    assert torch.equal(model(x=x), base(x))  # zero init is the identity
    _randomize(model)
    layer = model.base_model.model.lin2
    assert isinstance(layer, ScaleShiftLinear)
    hidden = torch.relu(base.lin1(torch.relu(base.lin0(x))))
    expected = (1 + layer.ss_scale["default"]) * base.lin2(hidden) + layer.ss_shift["default"]
    torch.testing.assert_close(model(x=x), expected)


def test_stacked_adapters_compose_and_merge_in_order():
    model = get_peft_model(make_model("llama"), ScaleShiftConfig(target_modules=["q_proj", "o_proj"]), adapter_name="one")
    model.add_adapter("two", ScaleShiftConfig(target_modules=["q_proj", "o_proj"]))
    model.set_adapter(["one", "two"])
    _randomize(model)
    model.eval()
    inputs = make_inputs("llama")
    with torch.no_grad():
        stacked = model(**inputs).logits
        model.merge_adapter()
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        assert q_proj.merged_adapters == ["one", "two"] and q_proj.base_layer.bias is not None  # Llama has no bias
        torch.testing.assert_close(model(**inputs).logits, stacked, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
        assert q_proj.base_layer.bias is None  # the bias a merge added is gone again
        torch.testing.assert_close(model(**inputs).logits, stacked, atol=1e-4, rtol=1e-4)


def test_safe_merge_refuses_non_finite_and_leaves_weights():
    model = get_peft_model(make_model("mlp"), ScaleShiftConfig(target_modules=["lin0"]))
    layer = model.base_model.model.lin0
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.ss_scale["default"][0] = float("inf")
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


def test_saved_files_and_config_roundtrip(tmp_path):
    config = ScaleShiftConfig(target_modules=["lin0", "lin1"], init_scaleshift_weights=False)
    model = get_peft_model(make_model("mlp"), config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SCALESHIFT" and saved["target_modules"] == ["lin0", "lin1"]
    assert sorted(load_file(str(tmp_path / "adapter_model.safetensors"))) == [
        "base_model.model.lin0.ss_scale", "base_model.model.lin0.ss_shift",
        "base_model.model.lin1.ss_scale", "base_model.model.lin1.ss_shift",
    ]
    loaded = PeftConfig.from_pretrained(tmp_path)  # dispatches on peft_type to the plugin's class
    assert isinstance(loaded, ScaleShiftConfig) and loaded.init_scaleshift_weights is False


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match=r"\$\.init_scaleshift_weights: expected bool"):
        ScaleShiftConfig.from_dict({"peft_type": "SCALESHIFT", "init_scaleshift_weights": "yes"})
    with pytest.raises(ConfigError, match="layers_pattern"):
        ScaleShiftConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(TargetNotFoundError, match="no installed plugin can wrap it"):
        get_peft_model(make_model("embedding"), ScaleShiftConfig(target_modules=["emb"]))


def test_legacy_keys_load_through_map_state_dict(tmp_path):
    model = get_peft_model(make_model("mlp"), ScaleShiftConfig(target_modules=["lin0"], init_scaleshift_weights=False))
    model.eval()
    x = make_inputs("mlp")["x"]
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    legacy = {k.replace(".ss_scale", ".ss_gamma").replace(".ss_shift", ".ss_beta"): v for k, v in weights.items()}
    save_file(legacy, str(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(make_model("mlp"), tmp_path)
    torch.testing.assert_close(loaded(x=x), model(x=x))
