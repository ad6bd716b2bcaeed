"""Prefix tuning against HF PEFT (the oracle) on tiny Llama (grouped KV heads) and GPT-2 models.

The conformance suite targets layer adapters; prompt learning runs the equivalent checks here:
cross-loading both ways, save/load round trip, disable == base, only prefix parameters train,
mixed-batch rows == single-adapter runs (the core builds each row's key/value prefix from its
adapter), generate, bad configs.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peft_kernel
from peft_kernel import PeftConfig, PeftModel, get_peft_model
from peft_kernel.errors import CheckpointError, ConfigError, MixedBatchError
from peft_kernel_testing import make_model, max_abs_diff, perturb, run
from peft_kernel_testing.generation import check_generate_matches_greedy, greedy_decode
from peft_kernel_testing.hf_oracle import check_seq_cls_cross_load, hf_oracle
from peft_kernel_prefix_tuning import PrefixTuningConfig

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")

IDS = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 11, 12, 13], [0, 0, 21, 22, 23], [7, 7, 7, 8, 9]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
TOL = 1e-5
CASES = [("llama", {}), ("gpt2", {}), ("llama", {"prefix_projection": True, "encoder_hidden_size": 8})]
IDS_OF = [f"{k}{'-projection' if kw else ''}" for k, kw in CASES]


def _perturb(module: torch.nn.Module, seed: int) -> None:
    perturb(module, seed, scale=0.5)


def _ours(kind: str, seed: int = 0, **kw) -> PeftModel:
    model = get_peft_model(make_model(kind), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, **kw))
    _perturb(model.prompt_encoder, seed)
    return model.eval()


def _logits(model, **inputs) -> torch.Tensor:
    return run(model, inputs)


def _cache_of(output) -> object:
    """The output's key/value cache (``cache`` from transformers 5.24 on, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@pytest.mark.parametrize("kind, kw", CASES, ids=IDS_OF)
def test_hf_saved_adapter_loads_with_equal_outputs(kind, kw, tmp_path):
    """HF saves, ours loads: equal logits and loss, and equal greedy decoding through each library's
    forward. HF peft's generate is no oracle here: 0.21 with transformers 5.24 hands the prefix over
    under the deprecated `past_key_values`, so its first token comes from the base model; our
    generate is checked against greedy decoding through our forward instead."""
    with hf_oracle("HF peft building and saving a prefix"):
        hf = peft.get_peft_model(make_model(kind), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, **kw))
        _perturb(hf.prompt_encoder, 1)
        hf.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make_model(kind), tmp_path)
    with torch.no_grad():
        b = ours(input_ids=IDS, attention_mask=MASK, labels=IDS)
    assert b.logits.shape == (4, 5, 64) and _cache_of(b).get_seq_length() == 9
    tokens = check_generate_matches_greedy(ours, IDS[:2], max_new_tokens=4)
    with hf_oracle("HF peft running the prefix it saved"):
        hf = peft.PeftModel.from_pretrained(make_model(kind), tmp_path)  # inference form, as ours loads it
        with torch.no_grad():
            a = hf(input_ids=IDS, attention_mask=MASK, labels=IDS)
        hf_plain = _logits(hf, input_ids=IDS)
        hf_tokens, hf_steps = greedy_decode(hf, IDS[:2], max_new_tokens=4)
    assert ours.peft_config["default"].token_dim == hf.peft_config["default"].token_dim
    assert max_abs_diff(a.logits, b.logits) <= TOL and abs(a.loss.item() - b.loss.item()) <= TOL
    assert _cache_of(a).get_seq_length() == 9
    assert max_abs_diff(hf_plain, _logits(ours, input_ids=IDS)) <= TOL
    assert torch.equal(hf_tokens, tokens)
    assert max_abs_diff(hf_steps, greedy_decode(ours, IDS[:2], max_new_tokens=4)[1]) <= TOL


@pytest.mark.parametrize("kind, kw", CASES, ids=IDS_OF)
def test_our_adapter_loads_in_hf_with_equal_outputs(kind, kw, tmp_path):
    ours = _ours(kind, **kw)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    reloaded = PeftModel.from_pretrained(make_model(kind), tmp_path)
    assert max_abs_diff(_logits(reloaded, input_ids=IDS, attention_mask=MASK), _logits(ours, input_ids=IDS, attention_mask=MASK)) <= TOL
    with hf_oracle("HF peft building and running its own prefix (the control)"):
        hf_reference = peft.get_peft_model(make_model(kind), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, **kw))
        _logits(hf_reference.eval(), input_ids=IDS, attention_mask=MASK)
    expected = {k: v for k, v in hf_reference.peft_config["default"].to_dict().items() if k not in ("peft_type", "task_type")}
    assert {k: v for k, v in saved.items() if k not in ("peft_type", "task_type", "inference_mode")} == {
        k: v for k, v in expected.items() if k != "inference_mode"}
    hf = peft.PeftModel.from_pretrained(make_model(kind), tmp_path)  # HF reading our files: the check itself
    assert max_abs_diff(_logits(hf, input_ids=IDS, attention_mask=MASK), _logits(ours, input_ids=IDS, attention_mask=MASK)) <= TOL


def test_saved_tensor_layout(tmp_path):

    ours = _ours("llama", prefix_projection=True)
    ours.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    # Llama with 4 query / 2 key-value heads of 4 dims: the prefix per layer is 2 * 4 wide
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (3, 2 * 2 * 8)
    assert ours.peft_config["default"].token_dim == 8 and ours.peft_config["default"].num_attention_heads == 2
    with pytest.raises(CheckpointError, match="is_trainable=False"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_disable_is_base_and_output_changes(kind):
    ours = _ours(kind)
    base = make_model(kind)
    expected = _logits(base, input_ids=IDS, attention_mask=MASK)
    with ours.disable_adapter():
        assert max_abs_diff(_logits(ours, input_ids=IDS, attention_mask=MASK), expected) == 0
    assert max_abs_diff(_logits(ours, input_ids=IDS, attention_mask=MASK), expected) > 1e-3


def test_only_prefix_parameters_train():
    model = get_peft_model(make_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                   prefix_projection=True)).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"prompt_encoder.default.{n}" for n in (
        "embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias")}
    model(input_ids=IDS, attention_mask=MASK, labels=IDS).loss.backward()
    assert model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("base_model."))


def test_zero_init():
    plain = get_peft_model(make_model("llama"), PrefixTuningConfig(num_virtual_tokens=2, init_weights="zero"))
    assert plain.prompt_encoder["default"]().abs().sum() == 0
    projected = get_peft_model(make_model("llama"), PrefixTuningConfig(num_virtual_tokens=2, init_weights="zero",
                                                                       prefix_projection=True))
    assert projected.prompt_encoder["default"]().abs().sum() == 0
    assert projected.prompt_encoder["default"].embedding.weight.abs().sum() > 0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_batch_rows_equal_single_adapter_runs(kind):
    model = _ours(kind)
    model.add_adapter("other", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    _perturb(model.prompt_encoder["other"], 7)
    model.eval()
    names = ["other", "default", "other", "default"]
    mixed = _logits(model, input_ids=IDS, attention_mask=MASK, adapter_names=names)
    for row, name in enumerate(names):
        model.set_adapter(name)
        single = _logits(model, input_ids=IDS[row : row + 1], attention_mask=MASK[row : row + 1])
        assert max_abs_diff(mixed[row : row + 1], single) <= TOL, (row, name)
    assert max_abs_diff(mixed[0], mixed[1]) > 1e-3
    gen = dict(max_new_tokens=3, do_sample=False)
    generated = model.generate(input_ids=IDS, attention_mask=MASK, adapter_names=names, **gen)
    for row, name in enumerate(names):
        model.set_adapter(name)
        assert torch.equal(generated[row : row + 1],
                           model.generate(input_ids=IDS[row : row + 1], attention_mask=MASK[row : row + 1], **gen))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_generate_equals_greedy_decoding_through_forward(kind, projection):
    """generate (cached and uncached) == argmax decoding through our own forward, token by token and
    logits within 1e-4 at every step: the key/value prefix must reach the model on the prefill step
    under the cache keyword the installed transformers reads. Padded rows and mixed batches included."""
    kw = {"prefix_projection": True, "encoder_hidden_size": 8} if projection else {}
    model = _ours(kind, **kw)
    model.add_adapter("other", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, **kw))
    _perturb(model.prompt_encoder["other"], 7)
    model.eval()
    check_generate_matches_greedy(model, IDS, MASK, max_new_tokens=5)
    check_generate_matches_greedy(model, IDS[:2], max_new_tokens=5)
    check_generate_matches_greedy(model, IDS, MASK, max_new_tokens=5, adapter_names=["other", "default", "default", "other"])
    base = make_model(kind)
    first = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=1, do_sample=False,
                           output_logits=True, return_dict_in_generate=True).logits[0]
    assert max_abs_diff(first, _logits(base, input_ids=IDS, attention_mask=MASK)[:, -1]) > 1e-3  # not the base model


def test_mixed_batch_refusals():
    model = _ours("llama")
    model.add_adapter("longer", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    model.eval()
    with pytest.raises(MixedBatchError, match="same num_virtual_tokens"):
        model(input_ids=IDS[:2], adapter_names=["default", "longer"])
    with pytest.raises(MixedBatchError, match="__base__"):
        model(input_ids=IDS[:2], adapter_names=["__base__", "default"])
    with pytest.raises(MixedBatchError, match="model.eval"):
        model.train()(input_ids=IDS[:2], adapter_names=["default", "default"])


def test_config_fields_and_defaults_match_hf():
    import dataclasses

    ours = PrefixTuningConfig().to_dict()
    hf = {f.name: f.default for f in dataclasses.fields(peft.PrefixTuningConfig)}
    assert set(ours) == set(hf)
    assert {k: ours[k] for k in ("prefix_projection", "encoder_hidden_size", "init_weights")} == {
        "prefix_projection": False, "encoder_hidden_size": None, "init_weights": None}
    assert peft_kernel.PrefixTuningConfig is PrefixTuningConfig
    loaded = PeftConfig.from_dict({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "prefix_projection": True})
    assert isinstance(loaded, PrefixTuningConfig) and loaded.prefix_projection


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(init_weights="one"), ConfigError, "init_weights must be None"),
        (dict(encoder_hidden_size=0), ConfigError, "encoder_hidden_size must be a positive int"),
    ],
)
def test_bad_configs(kwargs, error, message):
    with pytest.raises(error, match=message):
        PrefixTuningConfig(num_virtual_tokens=3, **kwargs)


def test_bad_configs_at_model_build():
    with pytest.raises(ConfigError, match="num_virtual_tokens must be a positive int"):
        get_peft_model(make_model("gpt2"), PrefixTuningConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match=r"\$.prefix_projection: expected bool"):
        PeftConfig.from_dict({"peft_type": "PREFIX_TUNING", "prefix_projection": "yes"})


def test_sequence_classification_with_bert_cross_loads_both_ways(tmp_path):
    """SEQ_CLS: the classifier head is a modules_to_save copy, saved as base_model.classifier.*."""
    check_seq_cls_cross_load(lambda: PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
                             lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3), tmp_path,
                             saved_keys=["base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"])
