"""LN tuning specifics: one adapter at a time (HF's errors), merging swaps the tuned copy in and
back, mixed batches run each adapter's copy on its rows (HF ignores ``adapter_names`` here),
blocks with submodules are refused, training touches only the copies."""

from __future__ import annotations

import pytest
import torch

import peft_kernel as pk
from peft_kernel.plugin_api import UnsupportedFeatureError
from peft_kernel_testing import make_inputs, make_model


def _model(**kwargs):
    model = pk.get_peft_model(make_model("llama"), pk.LNTuningConfig(task_type="CAUSAL_LM", **kwargs))
    model.add_adapter("other", pk.LNTuningConfig(task_type="CAUSAL_LM", **kwargs))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln_tuning_layers" in name:
                param.add_(torch.randn_like(param) * 0.5)
    return model.eval()


def _logits(model, inputs, **kwargs):
    return model(**inputs, **kwargs).logits


def test_one_adapter_at_a_time_as_hf():
    model = _model()
    inputs = make_inputs("llama")
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="more than one adapter at a time"):
        model(**inputs)
    with pytest.raises(ValueError, match="merging more than one adapter"):
        model.merge_adapter(["default", "other"])


def test_merge_swaps_the_copy_in_and_unmerge_restores_the_base_exactly():
    model = _model()
    inputs = make_inputs("llama")
    norm = model.base_model.model.model.layers[0].input_layernorm
    original, tuned = norm.base_layer, norm.ln_tuning_layers["default"]
    expected = _logits(model, inputs)
    model.merge_adapter()
    assert norm.base_layer is tuned
    torch.testing.assert_close(_logits(model, inputs), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unmerge it before merging"):
        model.merge_adapter(["other"])
    model.unmerge_adapter()
    assert norm.base_layer is original and norm.ln_tuning_layers["default"] is tuned
    merged = model.merge_and_unload()
    assert merged.model.layers[0].input_layernorm is tuned
    torch.testing.assert_close(merged(**inputs).logits, expected, rtol=0, atol=0)


def test_mixed_batch_rows_equal_single_adapter_runs():
    model = _model()
    inputs = make_inputs("llama")
    rows = inputs["input_ids"].shape[0]
    names = (["default", "other", "__base__"] * rows)[:rows]
    mixed = _logits(model, inputs, adapter_names=names)
    for name in ("default", "other"):
        model.set_adapter(name)
        single = _logits(model, inputs)
        for row, wanted in enumerate(names):
            if wanted == name:
                torch.testing.assert_close(mixed[row], single[row], rtol=0, atol=1e-6)
    with model.disable_adapter():
        base = _logits(model, inputs)
    for row, wanted in enumerate(names):
        if wanted == "__base__":
            torch.testing.assert_close(mixed[row], base[row], rtol=0, atol=1e-6)
    assert not torch.allclose(mixed[0], mixed[1])


def test_blocks_with_submodules_are_refused_by_name():
    with pytest.raises(UnsupportedFeatureError, match="'model.layers.0.mlp'.*submodules"):
        pk.get_peft_model(make_model("llama"), pk.LNTuningConfig(target_modules=["mlp"]))


def test_training_changes_only_the_tuned_copies():
    model = _model()
    model.set_adapter("default")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inputs = make_inputs("llama")
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".ln_tuning_layers.default." in n for n in changed)
