"""Bad input gets a clear error naming the problem, and nothing is lost."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_kernel import LoraConfig, PeftModel, get_peft_model
from peft_kernel.errors import AdapterNameError, CheckpointError, MixedBatchError
from peft_kernel_testing import make_inputs, make_model


def lora_model(**kwargs):
    config = LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False, **kwargs)
    return get_peft_model(make_model("mlp"), config).eval()


def test_checkpoint_key_matching_no_module_is_named(tmp_path):
    model = lora_model()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.lin9.lora_A.weight"] = torch.zeros(8, 10)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = make_model("mlp")
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"match no tensor.*lin9\.lora_A\.weight"):
        PeftModel.from_pretrained(base, tmp_path)
    # the caller's model is given back untouched
    assert set(base.state_dict()) == set(reference)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in reference.items())
    assert not any("lora" in n for n, _ in base.named_modules())


def test_shape_mismatch_names_module_and_shapes(tmp_path):
    lora_model(r=4).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 6
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"lin0\.lora_A\.weight: checkpoint \(4, 10\) vs model \(6, 10\)"):
        PeftModel.from_pretrained(make_model("mlp"), tmp_path)


def test_failed_load_adapter_keeps_the_other_adapters(tmp_path):
    model = lora_model()
    inputs = make_inputs("mlp")
    before = model(**inputs)
    (tmp_path / "adapter_config.json").write_text(LoraConfig(target_modules=["lin0"]).to_dict().__repr__())
    LoraConfig(target_modules=["lin0"]).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        model.load_adapter(tmp_path, adapter_name="broken")
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(model(**inputs), before)


@pytest.mark.parametrize("cut", [8, 100, -10])
def test_truncated_safetensors(tmp_path, cut):
    lora_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors is not a readable safetensors file.*Re-download"):
        PeftModel.from_pretrained(make_model("mlp"), tmp_path)


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(CheckpointError, match="not a local folder"):
        PeftModel.from_pretrained(make_model("mlp"), tmp_path / "nope")
    LoraConfig(target_modules=["lin0"]).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        PeftModel.from_pretrained(make_model("mlp"), tmp_path)


def test_pickle_weights_are_opt_in(tmp_path):
    model = lora_model()
    inputs = make_inputs("mlp")
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    with pytest.raises(CheckpointError, match="pickle file.*allow_pickle=True"):
        PeftModel.from_pretrained(make_model("mlp"), tmp_path)
    loaded = PeftModel.from_pretrained(make_model("mlp"), tmp_path, allow_pickle=True)
    torch.testing.assert_close(loaded(**inputs), model(**inputs))


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    good = lora_model()
    good.save_pretrained(tmp_path)
    weights_before = (tmp_path / "adapter_model.safetensors").read_bytes()
    config_before = (tmp_path / "adapter_config.json").read_text()

    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    other = lora_model(r=4)
    with pytest.raises(KeyboardInterrupt):
        other.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == weights_before
    assert (tmp_path / "adapter_config.json").read_text() == config_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize(
    "name, message",
    [
        ("default", "already exists"),
        ("my.adapter", "no dots"),
        ("lora_x", "collides with the parameter prefix 'lora_'"),
        ("my.adapter", "no dots"),
        ("__base__", "reserved"),
        ("", "not usable"),
    ],
)
def test_bad_adapter_names(name, message):
    model = lora_model()
    with pytest.raises(AdapterNameError, match=message):
        model.add_adapter(name, LoraConfig(target_modules=["lin0"]))
    assert list(model.peft_config) == ["default"]


def test_unknown_adapter_in_set_and_delete():
    model = lora_model()
    with pytest.raises(AdapterNameError, match=r"unknown adapter\(s\) \['nope'\]; this model has \['default'\]"):
        model.set_adapter("nope")
    with pytest.raises(AdapterNameError, match="unknown adapter"):
        model.delete_adapter("nope")


def test_mixed_batch_errors():
    model = lora_model()
    x = make_inputs("mlp")["x"]
    with pytest.raises(MixedBatchError, match="4 rows"):
        model(x, adapter_names=["default"] * 3)
    with pytest.raises(MixedBatchError, match=r"unknown adapter\(s\) \['other'\]"):
        model(x, adapter_names=["default", "other", "default", "default"])
    with pytest.raises(MixedBatchError, match="one per row"):
        model(x, adapter_names="default")
    model.train()
    with pytest.raises(MixedBatchError, match="model.eval"):
        model(x, adapter_names=["default"] * 4)
    model.eval()
    model.merge_adapter()
    with pytest.raises(MixedBatchError, match="merged"):
        model(x, adapter_names=["default"] * 4)


def test_safe_merge_refuses_broken_adapter_and_keeps_weights():
    model = lora_model()
    with torch.no_grad():
        model.base_model.model.lin0.lora_B["default"].weight[0, 0] = float("nan")
    base_weight = model.base_model.model.lin0.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaNs or infs detected while merging adapter 'default'"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, base_weight)


def test_unsupported_lora_options_are_refused_clearly():
    with pytest.raises(NotImplementedError, match="use_qalora=True"):
        get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"], use_qalora=True))


def test_adapter_of_another_method_cannot_join():
    import attrs

    from peft_kernel.config import PeftConfig

    model = lora_model()

    @attrs.define(kw_only=True)
    class Unknown(PeftConfig):
        peft_type: str = "SOMETHING_ELSE"

    with pytest.raises(Exception, match="SOMETHING_ELSE"):
        model.add_adapter("other", Unknown())


def test_other_methods_prefixes_do_not_restrict_lora_adapter_names():
    model = get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"]), adapter_name="ia3_head")
    assert list(model.peft_config) == ["ia3_head"]
