"""LoRA's ``layer_replication`` against HF PEFT (Llama) and an independent oracle (a layer list
repeating the same module objects): shared base weights, HF's keys both ways, generate == greedy
decoding (each copy keeps its own cache slot), merging refused with nothing merged, GPT-2 (which HF
cannot replicate), a second adapter must repeat the same ranges, bad ranges leave the model alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peft_kernel as pk
from peft_kernel.plugin_api import ConfigError, UnsupportedFeatureError
from peft_kernel_testing import make_model, max_abs_diff, perturb
from peft_kernel_testing.generation import check_generate_matches_greedy
from peft_kernel_testing.hf_oracle import hf_oracle

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")

IDS = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
RANGES = [[0, 2], [1, 2]]  # layers 0, 1, 1


def _ours(kind="llama", targets=("q_proj", "v_proj"), ranges=RANGES):
    model = pk.get_peft_model(make_model(kind), pk.LoraConfig(target_modules=list(targets), layer_replication=ranges,
                                                             init_lora_weights=False))
    perturb(model, 0, scale=0.5)
    return model.eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_layers_share_base_weights_and_cross_load_with_hf_both_ways(tmp_path):
    ours = _ours()
    layers = ours.base_model.model.model.layers
    assert len(layers) == 3 and ours.base_model.model.config.num_hidden_layers == 3
    assert layers[1] is not layers[2] and layers[1].mlp.up_proj.weight is layers[2].mlp.up_proj.weight
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    assert layers[1].self_attn.q_proj.lora_A["default"] is not layers[2].self_attn.q_proj.lora_A["default"]
    ours.save_pretrained(tmp_path / "ours")
    with hf_oracle("HF peft loading a replicated LoRA"):
        hf = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "ours").eval()
        expected = _logits(hf)
        hf.save_pretrained(tmp_path / "hf")
    assert max_abs_diff(_logits(ours), expected) <= 1e-5
    back = pk.PeftModel.from_pretrained(make_model("llama"), tmp_path / "hf")
    assert max_abs_diff(_logits(back), expected) <= 1e-5


def test_disabled_adapter_equals_the_base_run_through_the_repeated_layers():
    ours = pk.get_peft_model(make_model("llama"), pk.LoraConfig(target_modules=["q_proj"], layer_replication=RANGES)).eval()
    oracle = make_model("llama").eval()
    first, second = oracle.model.layers
    oracle.model.layers = nn.ModuleList([first, second, second])
    oracle.config.num_hidden_layers = 3
    with ours.disable_adapter(), torch.no_grad():  # no cache: the oracle's repeated module has one cache slot
        got = ours(input_ids=IDS, use_cache=False).logits
    with torch.no_grad():
        expected = oracle(input_ids=IDS, use_cache=False).logits
    assert max_abs_diff(got, expected) <= 1e-5


def test_generate_equals_greedy_decoding_through_forward():
    check_generate_matches_greedy(_ours(), IDS, max_new_tokens=4)


def test_merging_is_refused_and_leaves_nothing_merged():
    ours = _ours()
    before = {n: p.clone() for n, p in ours.base_model.model.named_parameters() if "lora" not in n}
    for call in (ours.merge_adapter, ours.merge_and_unload):
        with pytest.raises(UnsupportedFeatureError, match="layer_replication"):
            call()
        assert all(not m.merged_adapters for m in ours.modules() if hasattr(m, "merged_adapters"))
        assert all(torch.allclose(p, before[n], rtol=0, atol=1e-6)  # layers merged before the refusal: unmerged
                   for n, p in ours.base_model.model.named_parameters() if n in before)


def test_gpt2_which_hf_cannot_replicate():
    ours = _ours("gpt2", targets=("c_attn",), ranges=[[0, 1], [0, 2]])
    assert len(ours.base_model.model.transformer.h) == 3 and ours.base_model.model.config.num_hidden_layers == 3
    check_generate_matches_greedy(ours, IDS, max_new_tokens=3)


def test_a_second_adapter_must_repeat_the_same_ranges():
    ours = _ours()
    ours.add_adapter("same", pk.LoraConfig(target_modules=["q_proj"], layer_replication=RANGES))
    assert len(ours.base_model.model.model.layers) == 3
    with pytest.raises(ConfigError, match="already replicated"):
        ours.add_adapter("other", pk.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 1]]))
    assert set(ours.peft_config) == {"default", "same"} and len(ours.base_model.model.model.layers) == 3


@pytest.mark.parametrize("ranges", [[[0, 3]], [[1, 0]], [[0]], [[-1, 1]], [[0, True]], "0-2"])
def test_bad_ranges_are_named_and_change_nothing(ranges):
    base = make_model("llama")
    layers = list(base.model.layers)
    with pytest.raises(ConfigError, match="layer_replication"):
        pk.get_peft_model(base, pk.LoraConfig(target_modules=["q_proj"], layer_replication=ranges))
    assert list(base.model.layers) == layers and base.config.num_hidden_layers == 2
