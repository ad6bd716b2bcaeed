"""Per-token adapter weights published for one forward (``peft_kernel.routing.AdapterMix``): every
additive layer the mix answers adds ``sum_i w_i * delta_i(x)``; layers it does not answer, disabled
layers and forwards outside the context compute as usual; merged layers refuse."""

from __future__ import annotations

import pytest
import torch
from core_toy import ToyConfig, make_stack, make_x

from peft_kernel import MixedBatchError, get_peft_model
from peft_kernel.layer import adapter_layers
from peft_kernel.routing import AdapterMix, adapter_mix, current_adapter_mix


def _two_adapters() -> torch.nn.Module:
    model = get_peft_model(make_stack(), ToyConfig(target_modules=["q", "v"], init_weights=False), "a")
    torch.manual_seed(1)
    model.add_adapter("b", ToyConfig(target_modules=["q", "v"], init_weights=False))
    return model.eval()


def _layer_output(model: torch.nn.Module, weights: dict[str, float]) -> torch.Tensor:
    """The expected output with constant weights: each layer's deltas scaled in place."""
    x = make_x().unsqueeze(1)
    layers = [layer for _, layer in adapter_layers(model.get_base_model())]
    saved = [{a: layer.toy_alpha[a] for a in weights} for layer in layers]
    try:
        for layer in layers:
            for a, w in weights.items():
                layer.toy_alpha[a] *= w
        model.base_model.set_adapter(list(weights))
        with torch.no_grad():
            return model(x)
    finally:
        for layer, alphas in zip(layers, saved):
            layer.toy_alpha.update(alphas)
        model.base_model.set_adapter("a")


def test_constant_weights_equal_scaled_adapters() -> None:
    model = _two_adapters()
    x = make_x().unsqueeze(1)
    mix = AdapterMix(["a", "b"], lambda layer: torch.tensor([0.25, -2.0]))
    with torch.no_grad(), adapter_mix(mix):
        assert current_adapter_mix() is mix
        out = model(x)
    assert current_adapter_mix() is None
    torch.testing.assert_close(out, _layer_output(model, {"a": 0.25, "b": -2.0}), rtol=0, atol=1e-6)


def test_per_token_weights_and_per_layer_answers() -> None:
    model = _two_adapters()
    x = make_x().unsqueeze(1)  # [6, 1, 8]: six "tokens" in one batch each
    weights = torch.linspace(0, 1, 12).reshape(6, 1, 2)
    q_layers = {id(layer) for name, layer in adapter_layers(model.get_base_model()) if name.endswith(".q")}
    mix = AdapterMix(["a", "b"], lambda layer: weights if id(layer) in q_layers else None)
    with torch.no_grad(), adapter_mix(mix):
        out = model(x)
    rows = []
    for i in range(6):  # row by row, with the v layers on the active adapter "a" as usual
        w = weights[i, 0]
        for name, layer in adapter_layers(model.get_base_model()):
            if name.endswith(".q"):
                layer.toy_alpha.update({"a": float(w[0]), "b": float(w[1])})
        model.base_model.set_adapter(["a", "b"])
        for name, layer in adapter_layers(model.get_base_model()):
            if name.endswith(".v"):
                layer.set_adapter(["a"])
        with torch.no_grad():
            rows.append(model(x[i:i + 1]))
        for _, layer in adapter_layers(model.get_base_model()):
            layer.toy_alpha.update({"a": 1.0, "b": 1.0})
    torch.testing.assert_close(out, torch.cat(rows), rtol=0, atol=1e-6)


def test_disabled_and_merged_layers() -> None:
    model = _two_adapters()
    x = make_x().unsqueeze(1)
    mix = AdapterMix(["a", "b"], lambda layer: torch.tensor([1.0, 1.0]))
    with torch.no_grad(), model.disable_adapter(), adapter_mix(mix):
        base = model(x)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(base, model(x))
    model.merge_adapter()
    with torch.no_grad(), adapter_mix(mix), pytest.raises(MixedBatchError, match="merged"):
        model(x)
