"""Llama-Adapter against HF PEFT (the oracle) on tiny Llama, Mistral (grouped-query attention, rotary
queries) and GPT-2 (fused ``c_attn``): checkpoints cross-load both ways with equal logits, ``generate``
equals greedy decoding through the forward and HF's tokens, and config fields, defaults, on-disk keys
and parameter counts are HF's."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from peft_kernel import PeftModel, get_peft_model
from peft_kernel_adaption_prompt import AdaptionPromptConfig
from peft_kernel_testing import make_model, max_abs_diff, perturb, run
from peft_kernel_testing.generation import check_generate_matches_greedy, greedy_decode
from peft_kernel_testing.hf_oracle import hf_oracle, hf_reads_ours

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")

IDS = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 11, 12, 13], [0, 0, 21, 22, 23]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
TOL = 1e-5
KINDS = ["llama", "mistral", "gpt2"]
ATTENTION = {"llama": "model.layers.{}.self_attn", "mistral": "model.layers.{}.self_attn", "gpt2": "transformer.h.{}.attn"}


def _kw(**kw):
    return {"task_type": "CAUSAL_LM", "adapter_len": 3, "adapter_layers": 2, **kw}


def _logits(model) -> torch.Tensor:
    return run(model, {"input_ids": IDS, "attention_mask": MASK})


def _hf(kind: str, seed: int, **kw):
    model = peft.get_peft_model(make_model(kind), peft.AdaptionPromptConfig(**_kw(**kw))).eval()
    perturb(model, seed, scale=0.5)  # the gates leave zero: the prompts count
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_hf_checkpoint_loads_with_equal_logits_and_generation(kind, tmp_path):
    # GPT-2's generate numbers left-padded rows' positions from the mask, its forward does not: the base
    # model alone already differs there, so GPT-2 generates the unpadded rows only
    rows = 2 if kind == "gpt2" else len(IDS)
    with hf_oracle("HF peft saving an adaption prompt adapter"):
        hf = _hf(kind, 1)
        hf.save_pretrained(tmp_path)
        expected = _logits(hf)
        hf_tokens, _ = greedy_decode(hf, IDS[:rows], MASK[:rows], max_new_tokens=4)
    ours = PeftModel.from_pretrained(make_model(kind), tmp_path)
    assert type(ours.base_model).__name__ == "AdaptionPromptModel"
    assert max_abs_diff(_logits(ours), expected) <= TOL
    assert max_abs_diff(_logits(ours), run(make_model(kind), {"input_ids": IDS, "attention_mask": MASK})) > 1e-3
    assert torch.equal(check_generate_matches_greedy(ours, IDS[:rows], MASK[:rows], max_new_tokens=4), hf_tokens)


@pytest.mark.parametrize("kind", KINDS)
def test_our_checkpoint_loads_in_hf_with_equal_logits(kind, tmp_path):
    ours = get_peft_model(make_model(kind), AdaptionPromptConfig(**_kw(adapter_layers=1)))
    perturb(ours, 2, scale=0.5)
    ours.eval().save_pretrained(tmp_path)
    layer = ATTENTION[kind].format(1)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(saved) == [f"base_model.model.{layer}.adaption_gate", f"base_model.model.{layer}.adaption_prompt"]
    assert saved[f"base_model.model.{layer}.adaption_prompt"].shape == (1, 3, 16)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAPTION_PROMPT" and config["target_modules"] == layer.rsplit(".", 1)[-1]

    def hf_loads_ours():
        return _logits(peft.PeftModel.from_pretrained(make_model(kind), tmp_path).eval())

    got = hf_reads_ours("HF peft loading our adaption prompt adapter", hf_loads_ours, lambda: _hf(kind, 3))
    assert max_abs_diff(got, _logits(ours)) <= TOL


def test_hf_generate_equals_ours(tmp_path):
    with hf_oracle("HF peft generating with an adaption prompt adapter"):
        hf = _hf("llama", 4)
        hf.save_pretrained(tmp_path)
        with torch.no_grad():
            expected = hf.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=5, do_sample=False)
    ours = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    with torch.no_grad():
        got = ours.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)


def test_parameter_counts_and_trainable_names_match_hf():
    ours = get_peft_model(make_model("llama"), AdaptionPromptConfig(**_kw(adapter_layers=1)))
    with hf_oracle("HF peft building an adaption prompt adapter"):
        hf = peft.get_peft_model(make_model("llama"), peft.AdaptionPromptConfig(**_kw(adapter_layers=1)))
        expected = hf.get_nb_trainable_parameters()
        names = sorted(n for n, p in hf.named_parameters() if p.requires_grad)
    assert ours.get_nb_trainable_parameters() == expected
    assert sorted(n.removesuffix(".default") for n, p in ours.named_parameters() if p.requires_grad) == names


def test_config_fields_and_defaults_match_hf():
    theirs = {f.name: f.default for f in dataclasses.fields(peft.AdaptionPromptConfig)}
    ours = AdaptionPromptConfig().to_dict()
    assert set(ours) == set(theirs)
    for name in ("target_modules", "adapter_len", "adapter_layers", "inference_mode"):
        assert ours[name] == theirs[name], name
    config = AdaptionPromptConfig(adapter_len=2, adapter_layers=1)
    assert config.is_adaption_prompt and not config.is_prompt_learning
    assert config.is_adaption_prompt == peft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1).is_adaption_prompt


def test_defaults_for_target_modules_are_hfs():
    for kind in KINDS:
        ours = get_peft_model(make_model(kind), AdaptionPromptConfig(**_kw(adapter_layers=1)))
        with hf_oracle("HF peft resolving target_modules"):
            hf = peft.get_peft_model(make_model(kind), peft.AdaptionPromptConfig(**_kw(adapter_layers=1)))
        assert ours.peft_config["default"].target_modules == hf.peft_config["default"].target_modules
