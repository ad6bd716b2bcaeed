"""aLoRA (``LoraConfig.alora_invocation_tokens``) against HF PEFT (tiny Llama, GPT-2) and independent
oracles: the adapter applies from the last occurrence of the invocation sequence on (the tokens before
it are the base model's, so a base KV cache continues into the adapter), rows without it are the base
model's, generate equals greedy decoding through the forward, mixed aLoRA / LoRA / base rows equal
single runs, merging / DoRA / other layer types are refused by name."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import peft_kernel as pk
from peft_kernel.plugin_api import ConfigError, UnsupportedFeatureError
from peft_kernel_testing import make_model, max_abs_diff, perturb
from peft_kernel_testing.generation import check_generate_matches_greedy
from peft_kernel_testing.hf_oracle import hf_oracle

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")

INVOKE = [5, 6]
# invocation once (starts at 2), twice (last starts at 3), absent
IDS = torch.tensor([[9, 10, 5, 6, 11, 12, 13], [5, 6, 20, 5, 6, 21, 22], [1, 2, 3, 4, 7, 8, 9]])
STARTS = [2, 3, None]


def _config(module, tokens=INVOKE, targets=("q_proj", "v_proj"), **kwargs):
    return module.LoraConfig(target_modules=list(targets), alora_invocation_tokens=tokens, task_type="CAUSAL_LM",
                             init_lora_weights=False, **kwargs)


def _ours(tokens=INVOKE, kind="llama", seed=0, **kwargs):
    model = pk.get_peft_model(make_model(kind), _config(pk, tokens, **kwargs))
    perturb(model, seed, scale=0.3)
    return model.eval()


def _logits(model, ids=IDS, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def test_hf_saved_adapter_loads_with_equal_logits_and_ours_loads_in_hf(tmp_path):
    with hf_oracle("HF peft building an aLoRA adapter"):
        torch.manual_seed(3)
        hf = peft.get_peft_model(make_model("llama"), _config(peft)).eval()
        expected = _logits(hf)
        hf.save_pretrained(tmp_path / "hf")
    ours = pk.PeftModel.from_pretrained(make_model("llama"), tmp_path / "hf").eval()
    assert ours.peft_config["default"].alora_invocation_tokens == INVOKE
    assert max_abs_diff(_logits(ours), expected) <= 1e-5
    base = _logits(make_model("llama"))
    for row, start in enumerate(STARTS):  # before the invocation (or without it): the base model
        before = IDS.shape[1] if start is None else start
        assert max_abs_diff(_logits(ours)[row, :before], base[row, :before]) <= 1e-6
        if start is not None:
            assert max_abs_diff(_logits(ours)[row, start:], base[row, start:]) > 1e-3

    mine = _ours()
    mine.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["alora_invocation_tokens"] == INVOKE
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "ours").eval()
    assert max_abs_diff(_logits(theirs), _logits(mine)) <= 1e-5


def test_gpt2_conv1d_equals_hf():
    with hf_oracle("HF peft building an aLoRA adapter on GPT-2"):
        torch.manual_seed(3)
        hf = peft.get_peft_model(make_model("gpt2"), _config(peft, targets=("c_attn",))).eval()
        expected = _logits(hf)
        state = peft.get_peft_model_state_dict(hf)
    ours = pk.get_peft_model(make_model("gpt2"), _config(pk, targets=("c_attn",))).eval()
    pk.set_peft_model_state_dict(ours, state)
    assert max_abs_diff(_logits(ours), expected) <= 1e-5


def test_generate_equals_hf_greedy_tokens_and_greedy_decoding_through_forward(tmp_path):
    with hf_oracle("HF peft generating with aLoRA"):
        torch.manual_seed(3)
        hf = peft.get_peft_model(make_model("llama"), _config(peft)).eval()
        with torch.no_grad():
            expected = hf.generate(input_ids=IDS, max_new_tokens=4, do_sample=False)
        hf.save_pretrained(tmp_path)
    ours = pk.PeftModel.from_pretrained(make_model("llama"), tmp_path).eval()
    with torch.no_grad():
        got = ours.generate(input_ids=IDS, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)
    check_generate_matches_greedy(ours, IDS, max_new_tokens=4)  # also use_cache=False (HF differs there)


def test_rows_without_the_invocation_are_the_base_model_as_in_hf():
    ours = _ours()
    base = make_model("llama")
    absent = IDS[2:]
    assert max_abs_diff(_logits(ours, absent), _logits(base, absent)) <= 1e-6
    with torch.no_grad():
        got = ours.generate(input_ids=IDS, max_new_tokens=3, do_sample=False)
        plain = base.generate(input_ids=absent, max_new_tokens=3, do_sample=False)
    assert torch.equal(got[2:], plain)


def test_base_kv_cache_continues_into_the_adapter():
    """The cache of the tokens before the invocation is the base model's: a base prefill continued
    by the adapted model on the rest equals the adapted model on the whole sequence."""
    ours = _ours()
    base = make_model("llama")
    with torch.no_grad():
        cache = base(input_ids=IDS[:, :2], use_cache=True).past_key_values
        rest = ours(input_ids=IDS[:, 2:], past_key_values=cache).logits
    assert max_abs_diff(rest, _logits(ours)[:, 2:]) <= 1e-5


def test_explicit_alora_offsets_as_hf():
    with hf_oracle("HF peft with alora_offsets"):
        torch.manual_seed(3)
        hf = peft.get_peft_model(make_model("llama"), _config(peft)).eval()
        expected = _logits(hf, alora_offsets=[3, 1, 5])
        none = _logits(hf, alora_offsets=[3, None, 0])
        state = peft.get_peft_model_state_dict(hf)
    ours = pk.get_peft_model(make_model("llama"), _config(pk)).eval()
    pk.set_peft_model_state_dict(ours, state)
    assert max_abs_diff(_logits(ours, alora_offsets=[3, 1, 5]), expected) <= 1e-5
    assert max_abs_diff(_logits(ours, alora_offsets=[3, None, 0]), none) <= 1e-5
    embeds = make_model("llama").model.embed_tokens(IDS).detach()
    with torch.no_grad():  # the offsets need no input_ids
        got = ours(inputs_embeds=embeds, alora_offsets=[3, 1, 5]).logits
    assert max_abs_diff(got, expected) <= 1e-5


def test_mixed_alora_lora_and_base_rows_equal_single_runs():
    ours = _ours()
    ours.add_adapter("other", _config(pk, tokens=[20]))
    ours.add_adapter("plain", _config(pk, tokens=None))
    perturb(ours, 1, scale=0.3)
    ids = torch.cat([IDS, IDS[:2]])
    names = ["default", "other", "plain", "__base__", "other"]
    got = _logits(ours, ids, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with ours.disable_adapter():
                single = _logits(ours, ids[row:row + 1])
        else:
            ours.set_adapter(name)
            single = _logits(ours, ids[row:row + 1])
        assert max_abs_diff(got[row], single[0]) <= 1e-5, (row, name)
    ours.set_adapter("default")
    with torch.no_grad():
        mixed = ours.generate(input_ids=ids, max_new_tokens=3, do_sample=False, adapter_names=names)
    for row, name in enumerate(names):
        with torch.no_grad():
            single = ours.generate(input_ids=ids[row:row + 1], max_new_tokens=3, do_sample=False, adapter_names=[name])
        assert torch.equal(mixed[row:row + 1], single), (row, name)
    check_generate_matches_greedy(ours, ids, max_new_tokens=3, adapter_names=names)


def test_merging_is_refused_by_name():
    ours = _ours()
    for call in (ours.merge_adapter, ours.merge_and_unload):
        with pytest.raises(UnsupportedFeatureError, match="aLoRA does not support merging"):
            call()
    assert all(not m.merged_adapters for m in ours.modules() if hasattr(m, "merged_adapters"))


def test_dora_and_other_layer_types_are_refused_by_name():
    with pytest.raises(ConfigError, match="alora_invocation_tokens.*use_dora"):
        _config(pk, use_dora=True)
    with pytest.raises(ConfigError, match="alora_invocation_tokens.*Embedding"):
        pk.get_peft_model(make_model("llama"), _config(pk, targets=("embed_tokens",)))
    with pytest.raises(ConfigError, match="alora_invocation_tokens.*Conv2d"):
        pk.get_peft_model(make_model("conv2d"), _config(pk, targets=("conv0",)))


@pytest.mark.parametrize("tokens", ["5 6", [5, -1], [1.5], [True], 7])
def test_bad_invocation_tokens_are_named(tokens):
    with pytest.raises(ConfigError, match="alora_invocation_tokens"):
        pk.LoraConfig(alora_invocation_tokens=tokens, task_type="CAUSAL_LM")


def test_empty_invocation_is_plain_lora_and_other_tasks_warn_as_hf():
    plain = pk.get_peft_model(make_model("llama"), _config(pk, tokens=None))
    empty = pk.get_peft_model(make_model("llama"), _config(pk, tokens=[]))
    empty.load_state_dict(plain.state_dict())
    assert max_abs_diff(_logits(empty), _logits(plain)) <= 1e-6
    with pytest.warns(UserWarning, match="only supported for CAUSAL_LM"):
        pk.LoraConfig(alora_invocation_tokens=INVOKE, task_type="SEQ_CLS")


def test_inputs_embeds_only_runs_the_base_model_with_a_warning_as_hf():
    ours = _ours()
    base = make_model("llama")
    embeds = base.model.embed_tokens(IDS).detach()
    with pytest.warns(UserWarning, match="Cannot calculate aLoRA offsets"), torch.no_grad():
        got = ours(inputs_embeds=embeds).logits
    assert max_abs_diff(got, _logits(base)) <= 1e-6


def test_beam_search_rows_equal_single_row_beam_search():
    """HF PEFT refuses beam search with aLoRA; here the starts follow each row's beams."""
    ours = _ours()
    with torch.no_grad():
        batch = ours.generate(input_ids=IDS, max_new_tokens=3, do_sample=False, num_beams=3, num_return_sequences=2)
        for row in range(IDS.shape[0]):
            single = ours.generate(input_ids=IDS[row:row + 1], max_new_tokens=3, do_sample=False, num_beams=3,
                                   num_return_sequences=2)
            assert torch.equal(batch[2 * row:2 * row + 2], single), row


def test_training_reaches_the_adapter_from_the_invocation_on_only():
    ours = _ours()
    ours.train()
    ours(input_ids=IDS[2:], labels=IDS[2:]).loss.backward()  # no invocation: no gradient into the adapter
    grads = [p.grad for n, p in ours.named_parameters() if "lora_" in n]
    assert all(g is None or not g.any() for g in grads)
    ours.zero_grad()
    ours(input_ids=IDS[:1], labels=IDS[:1]).loss.backward()
    assert all(p.grad is not None and p.grad.any() for n, p in ours.named_parameters() if "lora_B" in n)
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


def test_status_and_weighted_combination_as_hf():
    ours = _ours()
    with hf_oracle("HF peft building an aLoRA adapter"):
        theirs = peft.get_peft_model(make_model("llama"), _config(peft))
        theirs.add_adapter("plain", _config(peft, tokens=None))
        theirs.add_weighted_adapter(["default", "plain"], [0.5, 0.5], "both", combination_type="linear")
    ours.add_adapter("plain", _config(pk, tokens=None))
    ours.add_weighted_adapter(["default", "plain"], [0.5, 0.5], "both", combination_type="linear")
    assert ours.peft_config["both"].alora_invocation_tokens == theirs.peft_config["both"].alora_invocation_tokens
    assert [(s.name, s.module_type, s.available_adapters) for s in ours.get_layer_status()] == \
        [(s.name, s.module_type, s.available_adapters) for s in theirs.get_layer_status()]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.set_adapter("both")  # the combination is an aLoRA adapter too: base model before the invocation
    base = _logits(make_model("llama"))
    assert max_abs_diff(_logits(ours)[2], base[2]) <= 1e-6 and max_abs_diff(_logits(ours)[0, 2:], base[0, 2:]) > 1e-3


def test_one_hook_pair_per_model_for_several_adapters():
    ours = _ours()
    ours.add_adapter("other", _config(pk, tokens=[20]))
    model = ours.get_base_model()
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    copied = copy.deepcopy(ours)  # its own decoding state
    with torch.no_grad():
        assert torch.equal(copied.generate(input_ids=IDS, max_new_tokens=3, do_sample=False),
                           ours.generate(input_ids=IDS, max_new_tokens=3, do_sample=False))


def test_a_layer_run_outside_the_model_forward_warns_and_adds_nothing():
    layer = _ours().get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 16)
    with pytest.warns(UserWarning, match="outside a forward"), torch.no_grad():
        got = layer(x)
    assert torch.equal(got, layer.base_layer(x))


def test_left_padded_rows_generate_as_unpadded_single_rows():
    ours = _ours()
    short = torch.tensor([[5, 6, 11, 12, 13]])
    ids = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1), IDS[:1]])
    mask = (torch.arange(7) >= torch.tensor([[2], [0]])).long()
    with torch.no_grad():
        batch = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        single = ours.generate(input_ids=short, max_new_tokens=3, do_sample=False)
    assert torch.equal(batch[0, 2:], single[0])


def test_conversion_to_lora_keeps_the_invocation(tmp_path):
    """HF PEFT's ``convert_to_lora`` drops ``alora_invocation_tokens`` (its LoRA adapts every token)."""
    from peft_kernel import save_as_lora

    ours = _ours()
    save_as_lora(tmp_path, ours, rank=8)
    back = pk.PeftModel.from_pretrained(make_model("llama"), tmp_path).eval()
    assert back.peft_config["default"].alora_invocation_tokens == INVOKE
    assert max_abs_diff(_logits(back), _logits(ours)) <= 1e-4


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    """Checkpointed layers run again in the backward, outside the model's forward: same starts."""
    def grads(checkpointing):
        base = make_model("llama")
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model = pk.get_peft_model(base, _config(pk))
        perturb(model, 0, scale=0.3)
        model.train()
        model(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    expected, got = grads(False), grads(True)
    assert expected.keys() == got.keys() and expected
    assert max(max_abs_diff(got[n], expected[n]) for n in expected) <= 1e-6


def test_hotswap_takes_the_new_invocation(tmp_path):
    """HF PEFT keeps the old invocation when hotswapping (the swapped adapter then equals neither)."""
    from peft_kernel import hotswap_adapter

    _ours(tokens=[20], seed=1).save_pretrained(tmp_path / "other")
    _ours(tokens=None, seed=1).save_pretrained(tmp_path / "plain")
    for saved in ("other", "plain"):
        ours = _ours()
        hotswap_adapter(ours, tmp_path / saved, adapter_name="default")
        loaded = pk.PeftModel.from_pretrained(make_model("llama"), tmp_path / saved).eval()
        assert max_abs_diff(_logits(ours), _logits(loaded)) <= 1e-6, saved
    plain = _ours(tokens=None)
    with pytest.raises(UnsupportedFeatureError, match="cannot hotswap the plain LoRA adapter"):
        hotswap_adapter(plain, tmp_path / "other", adapter_name="default")


def test_alora_and_lora_active_together_as_hf(tmp_path):
    with hf_oracle("HF peft with an aLoRA and a LoRA adapter active together"):
        torch.manual_seed(3)
        hf = peft.get_peft_model(make_model("llama"), _config(peft), adapter_name="first")
        hf.add_adapter("second", _config(peft, tokens=None))
        hf.base_model.set_adapter(["first", "second"])
        expected = _logits(hf.eval())
        hf.save_pretrained(tmp_path)
    ours = pk.PeftModel.from_pretrained(make_model("llama"), tmp_path / "first", adapter_name="first")
    ours.load_adapter(tmp_path / "second", adapter_name="second")
    ours.base_model.set_adapter(["first", "second"])
    assert max_abs_diff(_logits(ours.eval()), expected) <= 1e-5
