"""A failed load leaves the model exactly as it was: adapters, active adapter(s), every tensor
(base weights included), trainability and train/eval mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from peft_kernel import CheckpointError, LoraConfig, PeftModel, get_peft_model
from peft_kernel.checkpoint import WEIGHTS_NAME


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 16)
        self.lin1 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


class _WithBilinear(_MLP):
    def __init__(self) -> None:
        super().__init__()
        self.lin2 = nn.Bilinear(8, 8, 4)  # LoRA cannot wrap it


def _base(seed: int = 0) -> _MLP:
    torch.manual_seed(seed)
    return _MLP()


def _state(model: nn.Module) -> dict[str, Any]:
    return {
        "adapters": sorted(getattr(model, "peft_config", {})),
        "active": list(getattr(model, "active_adapters", [])),
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
    }


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["adapters"] == before["adapters"]
    assert after["active"] == before["active"]
    assert after["tensors"].keys() == before["tensors"].keys()
    changed = [k for k in before["tensors"] if not torch.equal(before["tensors"][k], after["tensors"][k])]
    assert changed == []
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]


def _save(tmp: Path, name: str, config: LoraConfig, seed: int = 1) -> Path:
    model = get_peft_model(_base(), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_()
    model.save_pretrained(tmp / name)
    return tmp / name


def _truncate(folder: Path) -> None:
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _other_rank(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / WEIGHTS_NAME))  # the weights of a rank-8 adapter, the config says 4
    save_file({k: torch.cat([v, v], dim=0 if "lora_A" in k else 1) for k, v in tensors.items()}, str(folder / WEIGHTS_NAME))


def _foreign_keys(folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({"base_model.model.nowhere.lora_A.weight": torch.zeros(4, 16)}, str(folder / WEIGHTS_NAME))


def _no_adapter_keys(folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({}, str(folder / WEIGHTS_NAME))


BREAKERS: dict[str, Callable[[Path], None]] = {
    "truncated": _truncate, "other-rank": _other_rank, "foreign-keys": _foreign_keys, "no-adapter-keys": _no_adapter_keys,
}


def _two_adapter_model(tmp: Path) -> PeftModel:
    good = _save(tmp, "good", LoraConfig(r=4, target_modules=["lin0", "lin1"]), seed=1)
    good2 = _save(tmp, "good2", LoraConfig(r=4, target_modules=["lin0"]), seed=2)
    model = PeftModel.from_pretrained(_base(), good, adapter_name="good")
    model.load_adapter(good2, "good2", is_trainable=True)
    model.set_adapter("good")
    return model


@pytest.mark.parametrize("breaker", sorted(BREAKERS))
@pytest.mark.parametrize("into", ["existing-name", "other-existing-name", "new-name"])
def test_failed_load_adapter_changes_nothing(tmp_path: Path, breaker: str, into: str) -> None:
    model = _two_adapter_model(tmp_path)
    bad = _save(tmp_path, "bad", LoraConfig(r=4, target_modules=["lin0", "lin1"]), seed=3)
    BREAKERS[breaker](bad)
    name = {"existing-name": "good", "other-existing-name": "good2", "new-name": "new"}[into]
    x = torch.randn(3, 16)
    out_before = model(x)
    before = _state(model)
    with pytest.raises((CheckpointError, ValueError, RuntimeError)):
        model.load_adapter(bad, name)
    _assert_same(before, _state(model))
    assert torch.equal(model(x), out_before)


def _pissa_folder(tmp: Path, name: str) -> Path:
    model = get_peft_model(_base(), LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="pissa"))
    model.save_pretrained(tmp / name)
    return tmp / name


@pytest.mark.parametrize("breaker", ["truncated", "foreign-keys", "no-adapter-keys"])
def test_failed_pissa_load_restores_the_base_weights(tmp_path: Path, breaker: str) -> None:
    """PiSSA rewrites the base weight when its layer is built; a failed load must undo that."""
    good = _save(tmp_path, "good", LoraConfig(r=4, target_modules=["lin0", "lin1"]), seed=1)
    model = PeftModel.from_pretrained(_base(), good, adapter_name="good")
    bad = _pissa_folder(tmp_path, "pissa")
    BREAKERS[breaker](bad)
    x = torch.randn(3, 16)
    out_before = model(x)
    before = _state(model)
    with pytest.raises(CheckpointError):
        model.load_adapter(bad, "pissa")
    _assert_same(before, _state(model))
    assert torch.equal(model(x), out_before)  # the other adapter's outputs are untouched


def test_failed_pissa_from_pretrained_gives_the_callers_model_back(tmp_path: Path) -> None:
    bad = _pissa_folder(tmp_path, "pissa")
    _foreign_keys(bad)
    base = _base()
    before = _state(base)
    with pytest.raises(CheckpointError):
        PeftModel.from_pretrained(base, bad)
    _assert_same(before, _state(base))


def test_failed_injection_restores_base_weights_rewritten_before_the_failure() -> None:
    torch.manual_seed(0)
    base = _WithBilinear()
    before = _state(base)
    with pytest.raises(Exception, match="lin2"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["lin0", "lin2"], init_lora_weights="pissa"))
    _assert_same(before, _state(base))


def test_successful_pissa_load_still_rewrites_the_base_as_hf(tmp_path: Path) -> None:
    """The guard only acts on failure: a good PiSSA adapter loads onto the residual base, as HF PEFT."""
    folder = _pissa_folder(tmp_path, "pissa")
    trained = get_peft_model(_base(), LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="pissa"))
    loaded = PeftModel.from_pretrained(_base(), folder)
    x = torch.randn(3, 16)
    assert torch.allclose(loaded(x), trained(x), atol=1e-5)
    assert not torch.equal(loaded.base_model.model.lin0.base_layer.weight, _base().lin0.weight)


def test_missing_keys_warn_and_are_returned(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _save(tmp_path, "partial", LoraConfig(r=4, target_modules=["lin0", "lin1"]))
    tensors = load_file(str(folder / WEIGHTS_NAME))
    dropped = "base_model.model.lin1.lora_B.weight"
    del tensors[dropped]
    save_file(tensors, str(folder / WEIGHTS_NAME))
    model = PeftModel.from_pretrained(_base(), _save(tmp_path, "good", LoraConfig(r=4, target_modules=["lin0"])))
    with pytest.warns(UserWarning, match="Found missing adapter keys") as record:
        result = model.load_adapter(folder, "partial")
    assert any("lin1.lora_B" in str(w.message) for w in record)
    assert result.missing_keys == ["base_model.model.lin1.lora_B.weight"]


def test_suspicious_values_warn(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _save(tmp_path, "odd", LoraConfig(r=4, target_modules=["lin0"]))
    tensors = load_file(str(folder / WEIGHTS_NAME))
    key_a, key_b = sorted(tensors)
    tensors[key_a] = tensors[key_a].clone()
    tensors[key_a][0, 0] = float("nan")
    tensors[key_b] = torch.ones_like(tensors[key_b], dtype=torch.int64)
    save_file(tensors, str(folder / WEIGHTS_NAME))
    with pytest.warns(UserWarning) as record:
        PeftModel.from_pretrained(_base(), folder)
    messages = " ".join(str(w.message) for w in record)
    assert "NaN or infinite" in messages and key_a in messages
    assert "not real floats" in messages and key_b in messages
