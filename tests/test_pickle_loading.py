"""``allow_pickle=True`` opens ``adapter_model.bin`` files, but still only with ``weights_only=True``:
a pickle that asks for any object other than tensors in plain containers is refused with a
``CheckpointError`` (and its code never runs), and so is a pickle that is not a state dict."""

from __future__ import annotations

import os

import pytest
import torch

from peft_kernel import LoraConfig, PeftModel, get_peft_model
from peft_kernel.errors import CheckpointError
from peft_kernel.layer import adapter_layers
from peft_kernel_testing import make_inputs, make_model


class _MakesADirectory:
    """Unpickling this calls ``os.makedirs(path)``: code run by ``pickle.load`` (weights_only=False)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _folder_with_bin(tmp_path, payload) -> None:
    get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"])).save_pretrained(tmp_path, safe_serialization=False)
    torch.save(payload, tmp_path / "adapter_model.bin")


def test_pickled_object_is_refused_even_with_allow_pickle(tmp_path):
    marker = tmp_path / "code-ran"
    tensors = get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"])).state_dict()
    payload = {"base_model.model.lin0.lora_A.weight": tensors["base_model.model.lin0.lora_A.default.weight"],
               "extra": _MakesADirectory(str(marker))}
    folder = tmp_path / "adapter"
    _folder_with_bin(folder, payload)
    base = make_model("mlp")
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin.*weights_only=True.*os\.makedirs"):
        PeftModel.from_pretrained(base, folder, allow_pickle=True)
    assert not marker.exists(), "the pickle's code ran: it was loaded without weights_only=True"
    # the caller's model is given back as it was
    assert not list(adapter_layers(base))
    for key, value in base.state_dict().items():
        torch.testing.assert_close(value, reference[key])
    # and a model that already holds an adapter keeps it, without the half-loaded one
    model = get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin1"]))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        model.load_adapter(folder, adapter_name="other", allow_pickle=True)
    assert sorted(model.peft_config) == ["default"] and not marker.exists()


@pytest.mark.parametrize(
    "payload, what",
    [
        ({"base_model.model.lin0.lora_A.weight": torch.zeros(8, 10), "note": "not a tensor"}, "dict"),
        ([torch.zeros(8, 10)], "list"),
        (3, "int"),
    ],
    ids=["str-value", "list", "int"],
)
def test_pickle_that_is_no_state_dict_is_refused(tmp_path, payload, what):
    _folder_with_bin(tmp_path, payload)
    with pytest.raises(CheckpointError, match=rf"adapter_model\.bin does not hold a state dict.*but {what}"):
        PeftModel.from_pretrained(make_model("mlp"), tmp_path, allow_pickle=True)


def test_corrupt_pickle_is_a_checkpoint_error(tmp_path):
    _folder_with_bin(tmp_path, {})
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin cannot be read"):
        PeftModel.from_pretrained(make_model("mlp"), tmp_path, allow_pickle=True)


def test_plain_pickled_state_dict_still_loads(tmp_path):
    model = get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"], init_lora_weights=False)).eval()
    model.save_pretrained(tmp_path, safe_serialization=False)
    loaded = PeftModel.from_pretrained(make_model("mlp"), tmp_path, allow_pickle=True).eval()
    inputs = make_inputs("mlp")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), model(**inputs))
