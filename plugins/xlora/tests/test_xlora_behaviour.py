"""X-LoRA against HF PEFT (the oracle) on a tiny Llama with three LoRA experts: the scalings and
logits for every option, generate (ours with the key/value cache, HF's without), HF's public
XLoraModel methods, status and parameter counts, training, and what X-LoRA refuses."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from xlora_support import IDS, classifier_state, hf_twin, llama, logits, ours, randomise_classifier, xlora_kwargs

from peft_kernel import LoraConfig, MixedBatchError, get_peft_model
from peft_kernel.errors import ConfigError
from peft_kernel_testing import make_model, max_abs_diff
from peft_kernel_testing.generation import check_generate_matches_greedy
from peft_kernel_testing.hf_oracle import hf_oracle
from peft_kernel_xlora import XLoraConfig

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")
TOL = 1e-5

OPTIONS = [
    {},
    {"layerwise_scalings": True},
    {"xlora_depth": 1},
    {"xlora_depth": 3, "xlora_dropout_p": 0.3},  # dropout is off in eval mode
    {"top_k_lora": 2},
    {"top_k_lora": 2, "enable_softmax_topk": True, "enable_softmax": False, "layerwise_scalings": True},
    {"top_k_lora": 1, "enable_softmax_topk": True},
    {"top_k_lora": 2, "enable_softmax_topk": True, "scaling_pass_value": 0.5},
    {"enable_softmax": False, "global_scaling_weight": 2.5},
    {"softmax_temperature": 0.4, "scaling_pass_value": 0.5},
    {"top_k_lora": 2, "scaling_pass_value": 0.4, "global_scaling_weight": 1.5},  # the scaling pass takes both
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_scalings_and_logits_equal_hfs(experts, options):
    model = ours(experts, **options)
    with hf_oracle("HF peft running X-LoRA"):
        hf = hf_twin(peft, experts, model, **options)
        expected = logits(hf)
        expected_scalings = hf.base_model.get_latest_scalings()
    got = logits(model)
    assert max_abs_diff(got, expected) <= TOL
    assert max_abs_diff(model.base_model.get_latest_scalings(), expected_scalings) <= TOL
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=IDS).logits
    assert max_abs_diff(base, logits(llama())) <= TOL
    assert max_abs_diff(got, base) > 1e-2  # the experts do something


def test_the_config_has_hfs_fields_defaults_and_warnings():
    hf_fields = {f.name: f.default for f in dataclasses.fields(peft.XLoraConfig)}
    with pytest.warns(UserWarning, match="hidden_size") as record:
        config = XLoraConfig()
    assert any("adapters" in str(w.message) for w in record)
    mine = config.to_dict()
    for name, default in hf_fields.items():
        if name not in ("peft_type", "peft_version", "hidden_size", "adapters"):
            assert mine[name] == default, name
    assert (config.hidden_size, config.adapters) == (4096, {})  # HF's values after its warnings
    with pytest.warns(UserWarning, match="enable_softmax_topk"):
        XLoraConfig(hidden_size=8, adapters={"0": "x"}, enable_softmax_topk=True)


@pytest.mark.parametrize("bad, field", [
    ({"xlora_depth": 0}, "xlora_depth"), ({"top_k_lora": 0}, "top_k_lora"), ({"softmax_temperature": 0.0},
    "softmax_temperature"), ({"xlora_dropout_p": 1.0}, "xlora_dropout_p"), ({"hidden_size": "16"}, "hidden_size"),
    ({"adapters": ["a"]}, "adapters"),
])
def test_bad_configs_raise_naming_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        XLoraConfig(**{"hidden_size": 8, "adapters": {"0": "x"}, **bad})


def test_unknown_keyword_arguments_raise():
    with pytest.raises(TypeError, match="bogus"):
        XLoraConfig(hidden_size=8, adapters={}, bogus=1)


def test_generate_with_the_cache_equals_greedy_decoding_and_hfs_tokens(experts):
    model = ours(experts, layerwise_scalings=True, scaling_pass_value=0.3, seed=5)
    tokens = check_generate_matches_greedy(model, IDS, max_new_tokens=5)
    with hf_oracle("HF peft generating with X-LoRA"):
        hf = hf_twin(peft, experts, model, layerwise_scalings=True, scaling_pass_value=0.3)
        with torch.no_grad():
            expected = hf.generate(input_ids=IDS, max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens, expected)
    base = llama().generate(input_ids=IDS, max_new_tokens=5, do_sample=False)
    assert not torch.equal(tokens, base)


def test_a_cache_from_elsewhere_is_refused(experts):
    model = ours(experts)
    with torch.no_grad():
        cache = llama()(input_ids=IDS, use_cache=True).cache
    with pytest.raises(Exception, match="did not produce"):
        model(input_ids=IDS[:, :1], cache=cache)


def test_hfs_public_methods(experts):
    model = ours(experts)
    with hf_oracle("HF peft's XLoraModel methods"):
        hf = hf_twin(peft, experts, model)
        for m in (hf, model):
            m.base_model.enable_scalings_logging()
            logits(m)
            logits(m, IDS[:, :3])
            m.base_model.disable_scalings_logging()
            logits(m)
        hf_log, hf_buckets = hf.base_model.get_scalings_log(), hf.base_model.get_bucketed_scalings_log()
    log, buckets = model.base_model.get_scalings_log(), model.base_model.get_bucketed_scalings_log()
    assert [t.shape for t in log] == [t.shape for t in hf_log]
    assert all(max_abs_diff(a, b) <= TOL for a, b in zip(log, hf_log))
    assert {k: v[0] for k, v in buckets.items()} == {k: v[0] for k, v in hf_buckets.items()} == {5: [0], 3: [1]}
    model.base_model.clear_scalings_log()
    assert model.base_model.get_scalings_log() == []

    for m in (hf, model):
        m.base_model.set_topk_lora(2)
        m.base_model.set_global_scaling_weight(0.5)
        m.base_model.set_scaling_pass_value(None)
    assert model.base_model.get_global_scaling_weight() == hf.base_model.get_global_scaling_weight() == 0.5
    assert model.base_model.xlora_config.scaling_pass_value == hf.base_model.xlora_config.scaling_pass_value == 1 / 3
    assert max_abs_diff(logits(model), logits(hf)) <= TOL
    with pytest.raises(ConfigError, match="top_k_lora"):
        model.base_model.set_topk_lora(0)


def test_status_and_parameter_counts_equal_hfs(experts):
    model = ours(experts)
    with hf_oracle("HF peft's X-LoRA status"):
        hf = hf_twin(peft, experts, model)
        hf_layers, hf_model = hf.get_layer_status(), hf.get_model_status()
        hf_counts = hf.get_nb_trainable_parameters()
    assert model.get_nb_trainable_parameters() == hf_counts
    layers = model.get_layer_status()
    assert [(s.name, s.module_type, s.available_adapters, s.requires_grad) for s in layers] == [
        (s.name, s.module_type, s.available_adapters, s.requires_grad) for s in hf_layers]
    status = model.get_model_status()
    for field in ("base_model_type", "adapter_model_type", "peft_types", "trainable_params", "total_params",
                  "num_adapter_layers", "available_adapters", "requires_grad"):
        assert getattr(status, field) == getattr(hf_model, field), field
    assert (model.active_adapter, list(model.peft_config)) == (hf.active_adapter, list(hf.peft_config))
    assert model.config is model.get_base_model().config and model.base_model.model is model.get_base_model()


@pytest.mark.parametrize("trainable_experts", [False, True])
def test_training_updates_the_classifier_and_with_use_trainable_adapters_the_experts(experts, trainable_experts):
    model = ours(experts, use_trainable_adapters=trainable_experts, xlora_dropout_p=0.0).train()
    with hf_oracle("HF peft training X-LoRA"):
        hf = hf_twin(peft, experts, model, use_trainable_adapters=trainable_experts).train()
        hf(input_ids=IDS, labels=IDS).loss.backward()
        hf_grads = {n.replace("lora_model.model.", "lora_model.model."): p.grad for n, p in hf.named_parameters()
                    if p.requires_grad}
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads) == sorted(hf_grads)
    assert all(g is not None and max_abs_diff(g, hf_grads[n]) <= TOL for n, g in grads.items())
    assert any("lora_A" in n for n in grads) == trainable_experts
    assert all("classifier" in n or "lora_" in n for n in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_merging_mixed_batches_and_more_adapters_are_refused(experts):
    model = ours(experts)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(MixedBatchError, match="adapter_names"):
        model(input_ids=IDS, adapter_names=["0", "1"])
    with pytest.raises(Exception, match="one X-LoRA adapter"):
        model.add_adapter("other", XLoraConfig(**xlora_kwargs(experts)))
    model.get_base_model().activation_checkpointing_enable()
    with pytest.raises(Exception, match="checkpointing"):
        model.train()(input_ids=IDS)
    model.eval()
    plain = model.unload()
    assert max_abs_diff(logits(plain), logits(llama())) <= TOL


def test_bad_models_and_experts_raise_and_leave_the_model_alone(experts, tmp_path):
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="hidden_size"):
        get_peft_model(model, XLoraConfig(**xlora_kwargs(experts, hidden_size=32)))
    broken = {**experts, "9": str(tmp_path / "missing")}
    with pytest.raises(Exception, match=r"adapters\['9'\]"):
        get_peft_model(model, XLoraConfig(**xlora_kwargs(broken)))
    with pytest.raises(ConfigError, match="empty"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(model, XLoraConfig(**xlora_kwargs({})))
    assert not any("lora" in n for n, _ in model.named_modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(Exception, match="transformers model"):
        get_peft_model(make_model("mlp"), XLoraConfig(**xlora_kwargs(experts)))


def test_the_state_dict_has_hfs_keys(experts):
    model = ours(experts)
    with hf_oracle("HF peft's X-LoRA state dict"):
        hf = hf_twin(peft, experts, model)
    assert sorted(classifier_state(hf)) == sorted(classifier_state(model))
    assert sorted(hf.state_dict()) == sorted(model.state_dict())


def test_beam_search_with_the_cache_equals_hfs(experts):
    """Beam search reorders the real pass's cache between steps; the scaling pass's is reordered too."""
    model = ours(experts, layerwise_scalings=True, seed=5)
    ids = torch.randint(1, 64, (6, 5), generator=torch.Generator().manual_seed(1))
    beams = {"max_new_tokens": 8, "do_sample": False, "num_beams": 4}
    with torch.no_grad():
        cached = model.generate(input_ids=ids, **beams)
        assert torch.equal(cached, model.generate(input_ids=ids, use_cache=False, **beams))
    with hf_oracle("HF peft beam search with X-LoRA"):
        hf = hf_twin(peft, experts, model, layerwise_scalings=True)
        with torch.no_grad():
            assert torch.equal(cached, hf.generate(input_ids=ids, **beams))


@pytest.mark.parametrize("kind, targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_one_expert_under_softmax_is_its_lora_adapter(tmp_path, kind, targets):
    """An independent oracle, for GPT-2 (Conv1D) too, which HF PEFT 0.21.2's X-LoRA cannot load ("Got
    unexpected keys"): a softmax over one expert is 1 for every token, so X-LoRA is that LoRA adapter.
    The key is a name, not a position: HF PEFT 0.21.2 activates the keys but names the experts by
    position, so its forward fails with a KeyError on such configs; ours names them as HF and runs."""
    torch.manual_seed(0)
    lora = get_peft_model(make_model(kind), LoraConfig(r=2, target_modules=targets, init_lora_weights=False)).eval()
    lora.save_pretrained(tmp_path)
    model = get_peft_model(make_model(kind), XLoraConfig(task_type="CAUSAL_LM", hidden_size=16, xlora_depth=1,
                                                        adapters={"solo": str(tmp_path)}))
    randomise_classifier(model)
    assert list(model.peft_config) == ["default", "0"]
    assert max_abs_diff(logits(model.eval()), logits(lora)) <= TOL
    assert max_abs_diff(logits(lora), logits(make_model(kind))) > 1e-3


def test_xlora_model_methods_have_hfs_signatures():
    import inspect

    from peft_kernel import XLoraModel

    for name in ("set_topk_lora", "set_global_scaling_weight", "set_scaling_pass_value", "get_global_scaling_weight",
                 "get_latest_scalings", "get_scalings_log", "enable_scalings_logging", "disable_scalings_logging",
                 "clear_scalings_log", "get_bucketed_scalings_log"):
        theirs, mine = inspect.signature(getattr(peft.XLoraModel, name)), inspect.signature(getattr(XLoraModel, name))
        assert list(mine.parameters) == list(theirs.parameters), name
