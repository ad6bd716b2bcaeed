"""Llama-Adapter behaviour with no HF oracle needed: mixed batches equal per-row single-adapter runs
(different prompt lengths and layer counts, base rows, generate), several adapters, disabling,
deleting, unloading, merging refused, training touches adapter tensors only, and bad configs name
their field."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from peft_kernel import PeftModel, get_peft_model
from peft_kernel.errors import ConfigError, UnsupportedFeatureError
from peft_kernel_adaption_prompt import AdaptionPromptConfig
from peft_kernel_testing import make_model, max_abs_diff, perturb, run
from peft_kernel_testing.generation import check_generate_matches_greedy

IDS = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 11, 12, 13], [0, 0, 21, 22, 23], [7, 7, 7, 8, 9]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
TOL = 1e-5


def _config(**kw) -> AdaptionPromptConfig:
    return AdaptionPromptConfig(**{"task_type": "CAUSAL_LM", "adapter_len": 3, "adapter_layers": 2, **kw})


def _logits(model, rows=slice(None), **kw) -> torch.Tensor:
    return run(model, {"input_ids": IDS[rows], "attention_mask": MASK[rows]}, **kw)


def _two_adapters(kind: str = "llama"):
    """``default`` (3 prompt vectors in both layers) and ``other`` (5 vectors, top layer only), trained."""
    model = get_peft_model(make_model(kind), _config())
    model.add_adapter("other", _config(adapter_len=5, adapter_layers=1))
    model.set_adapter(["default", "other"])
    perturb(model, 7, scale=0.5)
    model.set_adapter("default")
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_batch_rows_equal_single_adapter_runs(kind):
    model = _two_adapters(kind)
    names = ["default", "other", "__base__", "other"]
    mixed = _logits(model, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                single = _logits(model, slice(row, row + 1))
        else:
            model.set_adapter(name)
            single = _logits(model, slice(row, row + 1))
        assert max_abs_diff(mixed[row: row + 1], single) <= TOL, (row, name)
    assert max_abs_diff(mixed[0], mixed[3]) > 1e-3


def test_generate_with_a_mixed_batch_equals_greedy_decoding_through_the_forward():
    model = _two_adapters()
    names = ["other", "default", "__base__", "default"]
    tokens = check_generate_matches_greedy(model, IDS, MASK, max_new_tokens=4, adapter_names=names)
    model.set_adapter("other")
    alone = check_generate_matches_greedy(model, IDS[:1], MASK[:1], max_new_tokens=4)
    assert torch.equal(tokens[:1], alone)


def test_set_adapter_disable_delete_and_unload():
    model = _two_adapters()
    base = _logits(make_model("llama"))
    default = _logits(model)
    model.set_adapter("other")
    other = _logits(model)
    assert max_abs_diff(default, other) > 1e-3 and max_abs_diff(default, base) > 1e-3
    with model.disable_adapter():
        assert max_abs_diff(_logits(model), base) <= TOL
    assert max_abs_diff(_logits(model), other) <= TOL
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert max_abs_diff(_logits(model), default) <= TOL
    assert not any("other" in name for name in model.state_dict())
    plain = model.unload()
    assert type(plain.model.layers[1].self_attn).__name__ == "LlamaAttention"
    assert max_abs_diff(_logits(plain), base) <= TOL


def test_new_adapter_is_the_identity_also_with_attention_biases():
    """The gate starts at zero: nothing changes, also where ``o_proj`` has a bias (HF PEFT adds that
    bias a second time there, so its fresh adapter shifts every output)."""
    def biased():
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                                   pad_token_id=0, attention_bias=True))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.bias.normal_()
        return model.eval()

    model = get_peft_model(biased(), _config())
    assert max_abs_diff(_logits(model), _logits(biased())) <= TOL
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaption_gate" in name:
                param.fill_(0.7)
    assert max_abs_diff(_logits(model), _logits(biased())) > 1e-4


def test_save_and_load_several_adapters(tmp_path):
    model = _two_adapters()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert max_abs_diff(_logits(loaded), _logits(model)) <= TOL
    loaded.set_adapter("other")
    model.set_adapter("other")
    assert max_abs_diff(_logits(loaded), _logits(model)) <= TOL


def test_merging_is_refused_with_a_clear_error():
    model = _two_adapters()
    before = _logits(model)
    with pytest.raises(UnsupportedFeatureError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(UnsupportedFeatureError, match="cannot be merged"):
        model.merge_and_unload()
    assert max_abs_diff(_logits(model), before) <= TOL


def test_training_changes_only_the_active_adapters_tensors():
    model = _two_adapters()
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"base_model.model.model.layers.{i}.self_attn.adaption_{kind}.default"
                         for i in (0, 1) for kind in ("gate", "prompt")]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=IDS, attention_mask=MASK, labels=IDS).loss.backward()
        opt.step()
    changed = sorted(name for name, p in model.named_parameters() if not torch.equal(p, before[name]))
    assert changed == trainable


def test_gates_of_a_fresh_adapter_receive_gradients():
    model = get_peft_model(make_model("mistral"), _config()).train()
    model(input_ids=IDS, attention_mask=MASK, labels=IDS).loss.backward()
    gates = [p.grad for name, p in model.named_parameters() if "adaption_gate" in name]
    assert len(gates) == 2 and all(g is not None and g.abs().sum() > 0 for g in gates)


@pytest.mark.parametrize("kwargs, error, field", [
    ({"adapter_layers": 3}, ConfigError, "adapter_layers"),
    ({"target_modules": "nope"}, ConfigError, "target_modules"),
    ({"target_modules": "mlp"}, ConfigError, "target_modules"),
    ({"adapter_len": None}, ConfigError, "adapter_len"),
    ({"adapter_layers": None}, ConfigError, "adapter_layers"),
])
def test_bad_configs_for_the_model_name_the_field(kwargs, error, field):
    model = make_model("llama")
    with pytest.raises(error, match=field):
        get_peft_model(model, _config(**kwargs))
    assert type(model.model.layers[1].self_attn).__name__ == "LlamaAttention"


@pytest.mark.parametrize("kwargs, field", [
    ({"adapter_len": 0}, "adapter_len"),
    ({"adapter_layers": -1}, "adapter_layers"),
    ({"adapter_len": "3"}, "adapter_len"),
    ({"target_modules": ""}, "target_modules"),
    ({"target_modules": ["self_attn"]}, "target_modules"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        _config(**kwargs)


def test_unknown_keywords_raise():
    with pytest.raises(TypeError):
        AdaptionPromptConfig(adapter_len=3, adapter_layers=1, adapter_length=4)


def test_model_type_without_a_default_asks_for_target_modules():
    with pytest.raises(ConfigError, match="target_modules"):
        get_peft_model(make_model("opt"), _config(adapter_layers=1))


def test_every_attention_implementation_gives_the_same_outputs_and_no_hook_stays_behind():
    """The prompt term enters through hooks held for one call around the unchanged attention, so
    transformers' attention backends (eager, SDPA) all work and the projections end up hook-free."""
    model = _two_adapters()
    outputs = []
    for implementation in ("eager", "sdpa"):
        model.get_base_model().set_attn_implementation(implementation)
        outputs.append(_logits(model))
        outputs.append(_logits(model, adapter_names=["other", "default", "__base__", "default"]))
    real = MASK.bool()  # padded positions attend to nothing, which the backends fill differently
    assert max_abs_diff(outputs[0][real], outputs[2][real]) <= TOL
    assert max_abs_diff(outputs[1][real], outputs[3][real]) <= TOL
    attention = model.get_base_model().model.layers[1].self_attn.base_layer
    assert not attention.q_proj._forward_hooks and not attention.o_proj._forward_pre_hooks
