"""The kernel end to end on the inline toy method (``core_toy``), with no method plugin installed:
targeting, forward, adapters, disable, merge, save/load, transactions, atomic saves, mixed batches,
``modules_to_save`` and hotswap. Every expectation is computed by hand from the adapter's tensors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from core_toy import ToyConfig, ToyLinear, make_stack, make_x
from torch import nn

from peft_kernel import CheckpointError, PeftConfig, PeftModel, get_peft_model, hotswap_adapter, inject_adapter_in_model

ALL_QV = [f"encoder.layers.{i}.{m}" for i in range(3) for m in ("q", "v")]


def toy_modules(model: nn.Module) -> dict[str, ToyLinear]:
    """``{path relative to the base model: layer}`` of every toy layer."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, ToyLinear):
            found[name.removeprefix("base_model.model.")] = module
    return found


def expected_output(base: nn.Module, layers: dict[str, ToyLinear], adapter: str, x: torch.Tensor) -> torch.Tensor:
    """``base`` with ``W += alpha * outer(b, a)`` written by hand into every adapted Linear."""
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for path, layer in layers.items():
            if adapter in layer.toy_a:
                linear = reference.get_submodule(path)
                linear.weight += layer.toy_alpha[adapter] * torch.outer(layer.toy_b[adapter], layer.toy_a[adapter])
        return reference(x)


def toy(**kwargs: Any) -> ToyConfig:
    kwargs.setdefault("init_weights", False)
    return ToyConfig(**kwargs)


# ---- targeting --------------------------------------------------------------------------------
@pytest.mark.parametrize(("config", "targeted"), [
    ({"target_modules": ["q"]}, ["encoder.layers.0.q", "encoder.layers.1.q", "encoder.layers.2.q"]),
    ({"target_modules": ["q", "v", "head"]}, [*ALL_QV, "head"]),
    ({"target_modules": r"encoder\.layers\.[02]\.v"}, ["encoder.layers.0.v", "encoder.layers.2.v"]),
    ({"target_modules": ["q", "v"], "exclude_modules": ["layers.1.q", "encoder.layers.2.v"]},
     ["encoder.layers.0.q", "encoder.layers.0.v", "encoder.layers.1.v", "encoder.layers.2.q"]),
    ({"target_modules": ["q", "v"], "layers_to_transform": [0, 2], "layers_pattern": "layers"},
     ["encoder.layers.0.q", "encoder.layers.0.v", "encoder.layers.2.q", "encoder.layers.2.v"]),
    ({"target_modules": ["v"], "layers_to_transform": 1}, ["encoder.layers.1.v"]),
])
def test_targeting(config: dict[str, Any], targeted: list[str]) -> None:
    model = get_peft_model(make_stack(), toy(**config))
    assert sorted(toy_modules(model)) == sorted(targeted)
    assert sorted(model.base_model.targeted_module_names) == sorted(targeted)
    assert type(model.base_model).__name__ == "ToyModel"


def test_inject_adapter_in_model_wraps_in_place() -> None:
    base, x = make_stack(), make_x()
    before = base(x)
    model = inject_adapter_in_model(toy(target_modules=["q"]), make_stack())
    layers = toy_modules(model)
    assert sorted(layers) == ["encoder.layers.0.q", "encoder.layers.1.q", "encoder.layers.2.q"]
    out = model(x)
    assert not torch.allclose(out, before)
    torch.testing.assert_close(out, expected_output(base, layers, "default", x), atol=1e-6, rtol=1e-6)


# ---- forward, adapters, disable ---------------------------------------------------------------
def test_forward_is_base_plus_delta() -> None:
    base, x = make_stack(), make_x()
    model = get_peft_model(make_stack(), toy(target_modules=["q", "v"], alpha=0.5))
    layers = toy_modules(model)
    # one layer, by hand: base(x) + alpha * (x . a) b
    layer, h = layers["encoder.layers.0.q"], torch.randn(5, 8)
    manual = layer.base_layer(h) + 0.5 * (h @ layer.toy_a["default"])[:, None] * layer.toy_b["default"][None, :]
    torch.testing.assert_close(layer(h), manual, atol=1e-6, rtol=1e-6)
    # the whole model
    out = model(x)
    assert (out - base(x)).abs().max() > 1e-3
    torch.testing.assert_close(out, expected_output(base, layers, "default", x), atol=1e-6, rtol=1e-6)


def test_identity_init_leaves_the_output_unchanged() -> None:
    x = make_x()
    model = get_peft_model(make_stack(), ToyConfig(target_modules=["q", "v"]))
    torch.testing.assert_close(model(x), make_stack()(x), atol=0, rtol=0)


def test_add_set_delete_adapters() -> None:
    base, x = make_stack(), make_x()
    model = get_peft_model(make_stack(), toy(target_modules=["q", "v"]))
    model.add_adapter("second", toy(target_modules=["v"], alpha=2.0))
    layers = toy_modules(model)
    assert model.active_adapters == ["default"]
    assert [n for n, p in model.named_parameters() if p.requires_grad and "second" in n] == []
    torch.testing.assert_close(model(x), expected_output(base, layers, "default", x), atol=1e-6, rtol=1e-6)

    model.set_adapter("second")
    assert model.active_adapters == ["second"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".second" in n for n in trainable)
    torch.testing.assert_close(model(x), expected_output(base, layers, "second", x), atol=1e-6, rtol=1e-6)

    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert not any("second" in k for k in model.state_dict())
    assert all(set(layer.toy_alpha) == {"default"} for layer in layers.values())
    torch.testing.assert_close(model(x), expected_output(base, layers, "default", x), atol=1e-6, rtol=1e-6)


def test_disable_adapter_gives_the_base_output() -> None:
    base, x = make_stack(), make_x()
    model = get_peft_model(make_stack(), toy(target_modules=["q", "v", "head"]))
    adapted = model(x)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)
    torch.testing.assert_close(model(x), adapted, atol=0, rtol=0)


# ---- merge ------------------------------------------------------------------------------------
def test_merge_equals_unmerged_and_unmerge_restores_the_base() -> None:
    x = make_x()
    model = get_peft_model(make_stack(), toy(target_modules=["q", "v", "head"], alpha=0.7))
    layers = toy_modules(model)
    unmerged = model(x)
    base_weights = {p: l.base_layer.weight.detach().clone() for p, l in layers.items()}
    model.merge_adapter()
    for path, layer in layers.items():
        assert layer.merged_adapters == ["default"]
        want = base_weights[path] + 0.7 * torch.outer(layer.toy_b["default"], layer.toy_a["default"])
        torch.testing.assert_close(layer.base_layer.weight, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for path, layer in layers.items():
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, base_weights[path], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=1e-6)


def test_merge_and_unload_returns_the_plain_model() -> None:
    base, x = make_stack(), make_x()
    model = get_peft_model(make_stack(), toy(target_modules=["q", "v"]))
    expected = expected_output(base, toy_modules(model), "default", x)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "Stack" and not toy_modules(merged)
    assert all(type(m) is nn.Linear for m in (merged.encoder.layers[0].q, merged.encoder.layers[2].v))
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


# ---- save and load ----------------------------------------------------------------------------
def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".toy_" in k}


def test_save_load_roundtrip_is_bit_exact(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    x = make_x()
    config = toy(target_modules=["q", "v"], alpha=0.25, exclude_modules=["encoder.layers.1.v"])
    model = get_peft_model(make_stack(), config)
    model.add_adapter("other", toy(target_modules=["head"], alpha=3.0))
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TOY" and saved["alpha"] == 0.25 and saved["exclude_modules"] == ["encoder.layers.1.v"]
    assert sorted(saved["target_modules"]) == ["q", "v"]
    on_disk = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(on_disk) == sorted(f"base_model.model.{p}.toy_{t}" for p in ALL_QV if p != "encoder.layers.1.v" for t in "ab")
    assert sorted(load_file(str(tmp_path / "other" / "adapter_model.safetensors"))) == [
        "base_model.model.head.toy_a", "base_model.model.head.toy_b"]

    loaded = PeftModel.from_pretrained(make_stack(), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    assert isinstance(loaded.peft_config["default"], ToyConfig)
    for name in ("default", "other"):
        ours, theirs = model.peft_config[name].to_dict(), loaded.peft_config[name].to_dict()
        for key in ("inference_mode", "auto_mapping"):  # what loading and saving a custom model set
            ours.pop(key), theirs.pop(key)
        assert theirs == ours
        assert loaded.peft_config[name].auto_mapping == {"base_model_class": "Stack", "parent_library": "core_toy"}
    assert loaded.peft_config["default"].inference_mode is True
    before, after = _adapter_tensors(model), _adapter_tensors(loaded)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    loaded.set_adapter("other")
    model.set_adapter("other")
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert PeftConfig.from_pretrained(tmp_path).to_dict() == loaded.peft_config["default"].to_dict()


def _state(model: nn.Module) -> dict[str, Any]:
    return {
        "adapters": sorted(model.peft_config),
        "active": list(model.active_adapters),
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
    }


def _break_shapes(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: torch.cat([v, v]) for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))


def test_a_failing_load_changes_nothing(tmp_path: Path) -> None:
    get_peft_model(make_stack(1), toy(target_modules=["q"])).save_pretrained(tmp_path / "bad")
    _break_shapes(tmp_path / "bad")
    model = get_peft_model(make_stack(), toy(target_modules=["q", "v"]))
    model.add_adapter("second", toy(target_modules=["v"]))
    before = _state(model)
    for name in ("third", "second"):  # a new name and an existing one
        with pytest.raises(CheckpointError):
            model.load_adapter(tmp_path / "bad", name)
        after = _state(model)
        assert after["adapters"] == before["adapters"] and after["active"] == before["active"]
        assert after["tensors"].keys() == before["tensors"].keys()
        assert [k for k in before["tensors"] if not torch.equal(before["tensors"][k], after["tensors"][k])] == []
        assert after["requires_grad"] == before["requires_grad"]


def test_a_failing_from_pretrained_gives_the_base_model_back(tmp_path: Path) -> None:
    get_peft_model(make_stack(1), toy(target_modules=["q"])).save_pretrained(tmp_path / "bad")
    _break_shapes(tmp_path / "bad")
    base = make_stack()
    tensors = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CheckpointError):
        PeftModel.from_pretrained(base, tmp_path / "bad")
    assert not toy_modules(base) and all(type(m) is nn.Linear for m in base.encoder.layers[0].children())
    assert base.state_dict().keys() == tensors.keys()
    assert all(torch.equal(base.state_dict()[k], tensors[k]) for k in tensors)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_save_leaves_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    get_peft_model(make_stack(1), toy(target_modules=["q"])).save_pretrained(tmp_path / "ckpt")
    old = _files(tmp_path / "ckpt")
    model = get_peft_model(make_stack(), toy(target_modules=["q", "v"]))
    model.add_adapter("other", toy(target_modules=["head"]))
    real_save, calls = safetensors.torch.save_file, []

    def save_then_fail(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 2:  # the first adapter's weights are written, the second's write fails
            raise OSError(28, "No space left on device")
        real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "ckpt")
    assert len(calls) == 2
    assert _files(tmp_path / "ckpt") == old
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging folder left behind


# ---- mixed batches, modules_to_save, hotswap --------------------------------------------------
def test_mixed_batch_rows_equal_single_adapter_runs() -> None:
    x = make_x(6)
    model = get_peft_model(make_stack(), toy(target_modules=["q", "v"]))
    model.add_adapter("second", toy(target_modules=["v", "head"], alpha=2.0))
    model.eval()
    names = ["default", "second", "__base__", "second", "default", "__base__"]
    mixed = model(x, adapter_names=names)
    alone = {"default": model(x)}
    model.set_adapter("second")
    alone["second"] = model(x)
    with model.disable_adapter():
        alone["__base__"] = model(x)
    torch.testing.assert_close(alone["__base__"], make_stack()(x), atol=0, rtol=0)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(alone["default"], alone["second"])


def test_modules_to_save_train_save_and_load(tmp_path: Path) -> None:
    x = make_x()
    model = get_peft_model(make_stack(), toy(target_modules=["q"], modules_to_save=["classifier"]))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert [n for n in trainable if "classifier" in n] == [
        "base_model.model.classifier.modules_to_save.default.bias",
        "base_model.model.classifier.modules_to_save.default.weight",
    ]
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    original = model.base_model.model.classifier.original_module.weight.detach().clone()
    torch.testing.assert_close(original, make_stack().classifier.weight, atol=0, rtol=0)
    out = model(x)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), make_stack()(x), atol=0, rtol=0)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.classifier.weight" in keys and "base_model.model.classifier.bias" in keys
    loaded = PeftModel.from_pretrained(make_stack(), tmp_path)
    torch.testing.assert_close(loaded(x), out, atol=0, rtol=0)


def test_hotswap_replaces_the_weights_in_place(tmp_path: Path) -> None:
    x = make_x()
    first = get_peft_model(make_stack(), toy(target_modules=["q", "v"], alpha=0.5))
    torch.manual_seed(5)
    second = get_peft_model(make_stack(), toy(target_modules=["q", "v"], alpha=2.0))
    second.save_pretrained(tmp_path / "second")
    want = second(x)
    params = {n: p for n, p in first.named_parameters() if ".toy_" in n}
    assert not torch.allclose(first(x), want)
    hotswap_adapter(first, str(tmp_path / "second"), adapter_name="default")
    assert {n: p for n, p in first.named_parameters() if ".toy_" in n} == params  # the same Parameter objects
    assert all(layer.toy_alpha["default"] == 2.0 for layer in toy_modules(first).values())
    torch.testing.assert_close(first(x), want, atol=1e-6, rtol=1e-6)


def test_hotswap_refuses_other_targets(tmp_path: Path) -> None:
    get_peft_model(make_stack(), toy(target_modules=["head"])).save_pretrained(tmp_path / "head")
    model = get_peft_model(make_stack(), toy(target_modules=["q"]))
    with pytest.raises(CheckpointError, match="same target modules"):
        hotswap_adapter(model, str(tmp_path / "head"), adapter_name="default")
