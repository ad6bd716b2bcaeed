"""aLoRA in ``generate`` against HF PEFT and greedy decoding through our forward: ``alora_offsets``,
starts found once from the prompt (left padding, rows with different starts, generated invocations,
beams), HF's documented base-KV reuse, mixed aLoRA / LoRA / base rows, and the model's hooks leaving
with the last aLoRA adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import peft_kernel as pk
from peft_kernel_testing import make_model, perturb
from peft_kernel_testing.hf_oracle import hf_oracle

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")

INVOKE = [5, 6]
IDS = torch.tensor([[9, 10, 5, 6, 11, 12, 13], [5, 6, 20, 5, 6, 21, 22], [1, 2, 3, 4, 7, 8, 9]])
GREEDY = dict(max_new_tokens=4, do_sample=False)


def _config(module, tokens=INVOKE):
    return module.LoraConfig(target_modules=["q_proj", "v_proj"], alora_invocation_tokens=tokens,
                             task_type="CAUSAL_LM", init_lora_weights=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``(HF model, ours)`` with the same aLoRA adapter "default" and a plain LoRA adapter "plain"."""
    folder = tmp_path_factory.mktemp("alora")
    with hf_oracle("HF peft building aLoRA and LoRA adapters"):
        torch.manual_seed(3)
        hf = peft.get_peft_model(make_model("llama"), _config(peft)).eval()
        hf.add_adapter("plain", _config(peft, None))
        perturb(hf, 4, scale=0.3)
        hf.save_pretrained(folder)
    ours = pk.PeftModel.from_pretrained(make_model("llama"), folder).eval()
    ours.load_adapter(folder / "plain", adapter_name="plain")
    return hf, ours


def _generate(model, ids=IDS, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, **GREEDY, **kwargs)


def _greedy_with_offsets(model, ids, offsets, steps=4, **kwargs):
    """Greedy decoding through the forward, whole sequence each step: a row's offset grows by one
    per generated token (the generated tokens are adapted); rows that ended are padded, as generate."""
    config = model.generation_config
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for step in range(steps):
        grown = [None if o is None else o + step for o in offsets]
        with torch.no_grad():
            token = model(input_ids=ids, alora_offsets=grown, **kwargs).logits[:, -1].argmax(-1)
        token = torch.where(done, config.pad_token_id, token)
        done |= token == config.eos_token_id
        ids = torch.cat([ids, token[:, None]], 1)
    return ids


@pytest.mark.parametrize("offsets", [[3, 1, 5], [3, None, 2], [99, 1, 1]])
def test_generate_with_alora_offsets_equals_hf_and_greedy_decoding(pair, offsets):
    hf, ours = pair
    expected = _generate(hf, alora_offsets=offsets)
    assert torch.equal(_generate(ours, alora_offsets=offsets), expected)
    assert torch.equal(_generate(ours, alora_offsets=offsets, use_cache=False), expected)
    assert torch.equal(_greedy_with_offsets(ours, IDS, offsets), expected)
    assert torch.equal(_generate(ours, alora_offsets=torch.tensor([o or 0 for o in offsets])),
                       _generate(ours, alora_offsets=[o or 0 for o in offsets]))


def test_offset_zero_adapts_the_generated_tokens():
    """HF PEFT's generate treats ``alora_offsets=[0]`` as no adapter at all (its tokens are the base
    model's), although its forward adapts the generated tokens with the grown offsets: we follow
    the forward (and HF's docs: "all generated tokens will use the adapted weights")."""
    ours = pk.get_peft_model(make_model("llama"), _config(pk)).eval()
    perturb(ours, 0, scale=0.3)
    got = _generate(ours, alora_offsets=[0, 0, 0])
    assert torch.equal(got, _greedy_with_offsets(ours, IDS, [0, 0, 0]))
    assert not torch.equal(got, _generate(make_model("llama").eval()))


def test_the_prompt_given_as_inputs_is_searched_too(pair):
    """HF PEFT finds no invocation in ``generate(inputs=...)`` (its tokens are the base model's)."""
    hf, ours = pair
    with torch.no_grad():
        got = ours.generate(inputs=IDS, **GREEDY)
        theirs = hf.generate(inputs=IDS, **GREEDY)
    assert torch.equal(got, _generate(ours))
    assert torch.equal(theirs, _generate(make_model("llama").eval()))


def test_offsets_are_per_prompt_row_and_named_when_wrong(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="alora_offsets has 2 entries but the batch has 3 rows"):
        _generate(ours, alora_offsets=[1, 2])


def test_a_generated_invocation_starts_nothing_as_hf():
    """The starts come from the prompt: a row without the invocation stays the base model even when
    it generates the invocation (HF PEFT too; searching every forward would switch the adapter on)."""
    base = make_model("llama").eval()
    plain = _generate(base, IDS[2:])
    token = int(plain[0, IDS.shape[1] + 1])  # the second generated token
    assert token not in IDS[2].tolist()
    with hf_oracle("HF peft generating with a one-token invocation"):
        torch.manual_seed(3)
        hf = peft.get_peft_model(make_model("llama"), _config(peft, [token])).eval()
        expected = _generate(hf, IDS[2:])
        state = peft.get_peft_model_state_dict(hf)
    ours = pk.get_peft_model(make_model("llama"), _config(pk, [token])).eval()
    pk.set_peft_model_state_dict(ours, state)
    assert torch.equal(expected, plain)
    for use_cache in (True, False):
        with torch.no_grad():
            got = ours.generate(input_ids=IDS[2:], use_cache=use_cache, output_logits=True,
                                return_dict_in_generate=True, **GREEDY)
            logits = base.generate(input_ids=IDS[2:], use_cache=use_cache, output_logits=True,
                                   return_dict_in_generate=True, **GREEDY).logits
        assert torch.equal(got.sequences, expected)
        assert max((a - b).abs().max().item() for a, b in zip(got.logits, logits)) <= 1e-6  # no step adapted


def test_left_padded_rows_with_different_starts_equal_hf_and_single_rows(pair):
    hf, ours = pair
    rows = [[5, 6, 11, 12], [9, 10, 5, 6, 11, 12, 13], [3, 5, 6, 20, 21]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    expected = _generate(hf, ids, attention_mask=mask)
    got = _generate(ours, ids, attention_mask=mask)
    assert torch.equal(got, expected)
    for row, tokens in enumerate(rows):
        single = _generate(ours, torch.tensor([tokens]))
        assert torch.equal(got[row, width - len(tokens):][:single.shape[1]], single[0]), row  # single: no padding
    offsets = [2, 5, 4]  # explicit offsets count from the prompt's end: left padding does not shift them
    assert torch.equal(_generate(ours, ids, attention_mask=mask, alora_offsets=offsets),
                       _generate(hf, ids, attention_mask=mask, alora_offsets=offsets))


def _prefilled(model, ids):
    cache = DynamicCache()
    with model.disable_adapter(), torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    return cache


def test_documented_base_prefill_then_adapter_equals_the_full_run_and_hf(pair):
    """HF's aLoRA docs, "pattern 2": prefill the shared context with the adapter disabled, generate
    with the adapter from that cache; a copy of the base cache still serves the base model."""
    hf, ours = pair
    shared, invoked = IDS[:1, :2], IDS[:1]
    for model in (hf, ours):
        cache = _prefilled(model, shared)
        base_copy = copy.deepcopy(cache)
        assert torch.equal(_generate(model, invoked, past_key_values=cache), _generate(model, invoked))
        with model.disable_adapter():
            plain = _generate(model, shared)
            assert torch.equal(_generate(model, shared, past_key_values=base_copy), plain)
    assert torch.equal(_generate(ours, invoked, past_key_values=_prefilled(ours, shared)), _generate(hf, invoked))


def test_documented_base_generation_then_adapter_equals_the_full_run(pair):
    """HF's aLoRA docs, "pattern 1": the base model generates, its cache continues into the adapter
    on the base output followed by the invocation."""
    _, ours = pair
    prompt = IDS[2:, :4]
    with ours.disable_adapter(), torch.no_grad():
        out = ours.generate(input_ids=prompt, past_key_values=DynamicCache(), return_dict_in_generate=True, **GREEDY)
    invoked = torch.cat([out.sequences, torch.tensor([INVOKE])], 1)
    cached = out.past_key_values
    assert torch.equal(_generate(ours, invoked, past_key_values=cached), _generate(ours, invoked))


def test_an_invocation_inside_the_cached_prefix_is_found_as_hf(pair):
    """The prompt is searched whole, its cached part included (the cache holds base values there, so
    only the tokens after it are adapted: HF PEFT gives the same tokens)."""
    hf, ours = pair
    expected = _generate(hf, IDS[:1], past_key_values=_prefilled(hf, IDS[:1, :5]))
    got = _generate(ours, IDS[:1], past_key_values=_prefilled(ours, IDS[:1, :5]))
    assert torch.equal(got, expected)
    assert not torch.equal(got, _generate(ours.get_base_model(), IDS[:1], past_key_values=_prefilled(ours, IDS[:1, :5])))


def test_mixed_alora_lora_and_base_rows_equal_hf_in_forward_and_generate(pair):
    hf, ours = pair
    names = ["default", "plain", "__base__"]
    with torch.no_grad():
        assert (ours(input_ids=IDS, adapter_names=names).logits - hf(input_ids=IDS, adapter_names=names).logits
                ).abs().max() <= 1e-5
    assert torch.equal(_generate(ours, adapter_names=names), _generate(hf, adapter_names=names))
    offsets = [2, None, 3]  # the offsets reach the aLoRA rows only
    got = _generate(ours, adapter_names=names, alora_offsets=offsets)
    assert torch.equal(got, _greedy_with_offsets(ours, IDS, offsets, adapter_names=names))
    assert torch.equal(got[:1], _generate(ours, IDS[:1], alora_offsets=offsets[:1]))


def test_beams_keep_their_prompt_rows_start(pair):
    _, ours = pair
    with torch.no_grad():
        batch = ours.generate(input_ids=IDS, num_beams=2, num_return_sequences=2, alora_offsets=[3, 1, 5], **GREEDY)
        for row, offset in enumerate([3, 1, 5]):
            single = ours.generate(input_ids=IDS[row:row + 1], num_beams=2, num_return_sequences=2,
                                   alora_offsets=[offset], **GREEDY)
            assert torch.equal(batch[2 * row:2 * row + 2], single), row


def _hooked(model) -> bool:
    return bool(model._forward_pre_hooks) or bool(model._forward_hooks)


@pytest.mark.parametrize("leave", ["unload", "merge_and_unload", "delete_adapter"])
def test_the_models_hooks_leave_with_the_last_alora_adapter(leave):
    ours = pk.get_peft_model(make_model("llama"), _config(pk)).eval()
    ours.add_adapter("second", _config(pk, [20]))
    ours.add_adapter("plain", _config(pk, None))
    base = ours.get_base_model()
    ours.delete_adapter("second")
    assert _hooked(base)  # "default" is still an aLoRA adapter
    if leave == "delete_adapter":
        ours.set_adapter("plain")
        ours.delete_adapter("default")
        assert not _hooked(base)
        with torch.no_grad():
            ours(input_ids=IDS)  # plain LoRA goes on working
        return
    if leave == "merge_and_unload":
        ours.set_adapter("plain")
    plain = getattr(ours, leave)()
    assert plain is base and not _hooked(plain)
    assert not any(k.startswith("_peft_kernel_alora") for k in vars(plain))
    with torch.no_grad():
        plain(input_ids=IDS)


def test_plain_lora_ignores_alora_offsets_as_hf(pair):
    hf, ours = pair
    ours.set_adapter("plain")
    hf.set_adapter("plain")
    try:
        got = _generate(ours, alora_offsets=[1, 1, 1])
        assert torch.equal(got, _generate(ours)) and torch.equal(got, _generate(hf, alora_offsets=[1, 1, 1]))
    finally:
        ours.set_adapter("default")
        hf.set_adapter("default")
