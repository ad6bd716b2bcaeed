"""LoRA's ``trainable_token_indices`` against HF PEFT: list and per-module forms, a tied ``lm_head``
(GPT-2) sharing the input embedding's rows, cross-loading both ways with HF's keys, merging, mixed
batches with a token-less LoRA adapter, and the conflict with ``target_modules``."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

import peft_kernel as pk
from peft_kernel.plugin_api import ConfigError
from peft_kernel_testing import make_model, max_abs_diff, perturb
from peft_kernel_testing.hf_oracle import hf_oracle

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")

IDS = torch.tensor([[1, 2, 3, 4, 5, 6], [5, 5, 1, 0, 2, 4]])
CASES = {
    "llama-list": ("llama", [1, 3, 5], ["q_proj"]),
    "gpt2-tied": ("gpt2", [1, 3, 5], ["c_attn"]),
    "llama-per-module": ("llama", {"embed_tokens": [1], "lm_head": [2, 4]}, ["q_proj"]),
}


def _ours(kind, indices, targets, name="default"):
    model = pk.get_peft_model(make_model(kind), pk.LoraConfig(target_modules=targets, trainable_token_indices=indices,
                                                             init_lora_weights=False), name)
    perturb(model, 0, scale=0.5)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "trainable_tokens_delta" in param_name:
                param.add_(torch.randn_like(param))
    return model.eval()


def _logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_cross_load_both_ways_with_hfs_keys_and_counts(case, tmp_path):
    kind, indices, targets = CASES[case]
    ours = _ours(kind, indices, targets)
    with hf_oracle("HF peft building LoRA with trainable tokens"):
        fresh = peft.get_peft_model(make_model(kind), peft.LoraConfig(target_modules=targets, trainable_token_indices=indices))
        assert ours.get_nb_trainable_parameters() == fresh.get_nb_trainable_parameters()
    ours.save_pretrained(tmp_path / "ours")
    saved = sorted(k for k in load_file(tmp_path / "ours" / "adapter_model.safetensors") if "token" in k)
    assert saved and all(k.endswith(".token_adapter.trainable_tokens_delta") for k in saved)
    with hf_oracle("HF peft loading ours"):
        hf = peft.PeftModel.from_pretrained(make_model(kind), tmp_path / "ours").eval()
        hf_out = _logits(hf)
        hf.save_pretrained(tmp_path / "hf")
    assert sorted(k for k in load_file(tmp_path / "hf" / "adapter_model.safetensors") if "token" in k) == saved
    assert max_abs_diff(hf_out, _logits(ours)) <= 1e-5
    with warnings.catch_warnings(record=True) as seen:  # a tied module's rows load through the input embedding's key
        warnings.simplefilter("always")
        back = pk.PeftModel.from_pretrained(make_model(kind), tmp_path / "hf")
    assert not [w for w in seen if "missing" in str(w.message)], [str(w.message) for w in seen]
    assert max_abs_diff(_logits(back), hf_out) <= 1e-5
    base = _logits(make_model(kind).eval())
    assert max_abs_diff(_logits(ours), base) > 1e-2


def test_tied_rows_are_one_parameter_and_change_only_their_tokens():
    model = _ours("gpt2", [1, 3, 5], ["c_attn"])
    wte, lm_head = model.base_model.model.transformer.wte, model.base_model.model.lm_head
    assert wte.trainable_tokens_delta["default"] is lm_head.trainable_tokens_delta["default"]
    hidden = torch.randn(2, 16)
    changed = (lm_head(hidden) - lm_head.base_layer(hidden)).abs().amax(0) > 0
    assert changed.nonzero().flatten().tolist() == [1, 3, 5]


def test_merge_and_unload_keeps_the_outputs():
    model = _ours("gpt2", [1, 3, 5], ["c_attn"])
    expected = _logits(model)
    merged = model.merge_and_unload()
    assert type(merged.transformer.wte).__name__ == "Embedding"
    assert max_abs_diff(_logits(merged), expected) <= 1e-4  # merged LoRA weights round differently


def test_mixed_batch_rows_with_a_token_less_adapter_equal_single_runs():
    model = _ours("llama", [1, 3, 5], ["q_proj"])
    model.add_adapter("plain", pk.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    perturb(model, 3, scale=0.5)
    model.eval()
    names = ["default", "plain"]
    mixed = _logits(model, adapter_names=names)
    for row, name in enumerate(names):
        model.set_adapter(name)
        assert max_abs_diff(mixed[row], _logits(model, IDS[row: row + 1])[0]) <= 1e-5
    assert max_abs_diff(mixed[0], mixed[1]) > 1e-3


def test_a_module_cannot_be_both_a_lora_target_and_a_token_module():
    base = make_model("llama")
    with pytest.raises(ConfigError, match="both a LoRA target"):
        pk.get_peft_model(base, pk.LoraConfig(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[1]))
    assert type(base.model.embed_tokens).__name__ == "Embedding"
