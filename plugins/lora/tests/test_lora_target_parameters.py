"""LoRA ``target_parameters`` (HF PEFT's ``lora.ParamWrapper``) against HF ``peft`` (the oracle) and
an independent reference formula, on tiny mixture-of-experts models of transformers 5 (3-D expert
weights) and on a plain 2-D parameter: cross-loading both ways, HF's keys / status / parameter
counts, merge and unload, several adapters, mixed batches (refused, as HF), bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import peft_kernel as pk  # noqa: E402
from peft_kernel.plugin_api import ConfigError, MixedBatchError  # noqa: E402
from peft_kernel_lora.parameters import ParamWrapper  # noqa: E402

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=100)
IDS = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(3))


def make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=4, **SIZES)
    elif kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(moe_intermediate_size=16, shared_expert_intermediate_size=48, num_experts=4,
                                             num_experts_per_tok=2, **SIZES)
    else:
        config = transformers.Qwen3MoeConfig(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, **SIZES)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def kwargs(**extra) -> dict:
    return {"r": 2, "lora_alpha": 5, "target_modules": [], "target_parameters": EXPERTS, "init_lora_weights": False,
            **extra}


def logits(model: nn.Module, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, **extra).logits


def hf_model(base: nn.Module, **extra) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs(**extra))).eval()


def our_model(base: nn.Module, **extra) -> nn.Module:
    return pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(**kwargs(**extra))).eval()


def status(model: nn.Module) -> tuple:
    """``get_layer_status`` and ``get_model_status`` as plain values (ours and HF's are distinct classes)."""
    layers = [(s.name, s.module_type, s.enabled, s.active_adapters, s.merged_adapters, s.requires_grad,
               s.available_adapters, s.devices) for s in model.get_layer_status()]
    s = model.get_model_status()
    return layers, (s.trainable_params, s.total_params, s.num_adapter_layers, s.enabled, s.active_adapters,
                    s.merged_adapters, s.requires_grad, s.available_adapters)


CASES = {
    "mixtral experts": ("mixtral", {}),
    "qwen2-moe experts + shared expert modules": ("qwen2_moe", {"target_modules": ["shared_expert.up_proj"]}),
    "qwen3-moe experts, rslora, rank_pattern": ("qwen3_moe", {"use_rslora": True, "rank_pattern": {"down_proj": 3}}),
    "mixtral 2-D router weight + q_proj": ("mixtral", {"target_parameters": ["mlp.gate.weight"], "target_modules": ["q_proj"]}),
    "qwen3-moe a Linear's weight as a parameter": ("qwen3_moe", {"target_parameters": ["self_attn.o_proj.weight"]}),
    "mixtral one parameter, full name": ("mixtral", {"target_parameters": ["model.layers.1.mlp.experts.down_proj"]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_adapters_load_in_ours_and_ours_in_hf(case, tmp_path):
    kind, extra = CASES[case]
    base = make(kind)
    hf = hf_model(base, **extra)
    hf.save_pretrained(tmp_path / "hf")
    ours = pk.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "hf").eval()
    assert (logits(ours) - logits(hf)).abs().max() <= 1e-5
    assert not torch.allclose(logits(ours), logits(base), atol=1e-4)
    mine = our_model(base, **extra)
    mine.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert (logits(back) - logits(mine)).abs().max() <= 1e-5
    # the same keys and shapes, status, counts and targeted names as HF
    assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    assert status(mine) == status(hf)
    assert mine.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    assert mine.base_model.targeted_parameter_names == hf.base_model.targeted_parameter_names
    assert sorted(mine.base_model.targeted_module_names) == sorted(hf.base_model.targeted_module_names)


def test_the_delta_is_the_per_expert_product_of_hfs_layout():
    """Independent of HF: delta_e = scaling * B.reshape(out, r, E)[:, :, e] @ A.reshape(E, r, in)[e]."""
    base = make("mixtral")
    ours = our_model(base)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for i, layer in enumerate(ours.get_base_model().model.layers):
            for wrapper in (layer.mlp.experts, layer.mlp.experts.base_layer):
                a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
                param = getattr(reference.model.layers[i].mlp.experts, wrapper.parameter_name)
                experts, out_features, in_features = param.shape
                for e in range(experts):
                    delta = b.reshape(out_features, 2, experts)[:, :, e] @ a.reshape(experts, 2, in_features)[e]
                    param[e] += delta * 2.5
    assert (logits(ours) - logits(reference)).abs().max() <= 1e-5


def test_merge_unmerge_merge_and_unload_unload_and_disable():
    base = make("mixtral")
    ours = our_model(base)
    expected = logits(ours)
    ours.merge_adapter()
    assert (logits(ours) - expected).abs().max() <= 1e-5
    assert ours.get_layer_status()[0].merged_adapters == ["default"]
    ours.unmerge_adapter()
    assert (logits(ours) - expected).abs().max() <= 1e-5
    with ours.disable_adapter():
        assert (logits(ours) - logits(base)).abs().max() <= 1e-6
    merged = copy.deepcopy(ours).merge_and_unload(safe_merge=True)
    assert type(merged.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert (logits(merged) - expected).abs().max() <= 1e-5
    fresh = our_model(base)
    plain = fresh.unload()
    assert list(plain.state_dict()) == list(base.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), base.state_dict().values()))


def test_the_module_is_left_unparametrized_and_training_reaches_only_the_adapter():
    ours = our_model(make("mixtral"))
    ours.train()
    ours(input_ids=IDS).logits.sum().backward()
    outer = ours.get_base_model().model.layers[0].mlp.experts
    experts = outer.base_layer.base_layer
    assert type(experts).__name__ == "MixtralExperts" and "parametrizations" not in dict(experts.named_children())
    assert outer.lora_B["default"].weight.grad is not None and outer.base_layer.lora_A["default"].weight.grad is not None
    assert experts.down_proj.grad is None and not experts.down_proj.requires_grad


def test_several_adapters_set_adapter_and_save_load(tmp_path):
    base = make("mixtral")
    ours, hf = our_model(base), hf_model(base)
    for model, lib in ((ours, pk), (hf, peft)):
        model.add_adapter("other", lib.LoraConfig(**kwargs(r=3, lora_alpha=2)))
    hf.save_pretrained(tmp_path)
    for name in ("default", "other"):
        loaded = pk.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name if name != "default" else tmp_path)
        hf.set_adapter(name)
        assert (logits(loaded.eval()) - logits(hf)).abs().max() <= 1e-5
    ours.set_adapter("other")
    assert ours.active_adapters == ["other"]
    with pytest.raises(ValueError, match="all adapters must target the same set of parameters"):
        ours.add_adapter("third", pk.LoraConfig(**kwargs(target_parameters=["experts.down_proj"])))


def test_mixed_batches_are_refused_as_in_hf():
    """HF: "lora.ParamWrapper does not support mixed adapter batches yet." Ours refuses too: the
    experts' rows are tokens grouped by expert, not the batch's rows."""
    base = make("mixtral")
    ours = our_model(base)
    ours.add_adapter("other", pk.LoraConfig(**kwargs()))
    with pytest.raises(MixedBatchError, match="mixed adapter batches"):
        logits(ours, adapter_names=["default", "other", "__base__"])


@pytest.mark.parametrize("extra, error, match", [
    ({"target_parameters": ["experts.nope"]}, pk.NoMatchingPeftModuleError, "no `target_parameters` found"),
    ({"target_parameters": ["rotary_emb.inv_freq"]}, pk.NoMatchingPeftModuleError, "buffers"),
    ({"target_parameters": ["mlp.experts"]}, pk.NoMatchingPeftModuleError, "no `target_parameters` found"),
    ({"lora_dropout": 0.1}, ConfigError, "lora_dropout"),
    ({"use_dora": True}, ConfigError, "use_dora"),
    ({"lora_bias": True}, ConfigError, "lora_bias"),
    ({"init_lora_weights": "pissa"}, ConfigError, "init_lora_weights='pissa'"),
    ({"target_parameters": ["input_layernorm.weight"]}, ConfigError, "1 dimensional Parameter"),
    ({"target_modules": ["q_proj"], "target_parameters": ["q_proj.weight"]}, ValueError, "not also targeted"),
])
def test_bad_input_raises_like_hf(extra, error, match):
    base = make("mixtral")
    with pytest.raises((ValueError, AttributeError)):  # HF refuses each of these too (PiSSA: an AttributeError)
        hf_model(base, **extra)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = copy.deepcopy(base)
    with pytest.raises(error, match=match):
        pk.get_peft_model(model, pk.LoraConfig(**kwargs(**extra)))
    assert not any(isinstance(m, ParamWrapper) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("extra", [{"kasa_config": {}}, {"use_bdlora": {"target_modules_bd_a": ["down_proj"], "nblocks": 2}},
                                   {"arrow_config": {"top_k": 1}}, {"velora_config": {}}, {"monteclora_config": {}}])
def test_linear_layer_variants_are_refused_on_parameters(extra):
    with pytest.raises(ConfigError, match=f"does not work with {next(iter(extra))}"):
        pk.get_peft_model(make("mixtral"), pk.LoraConfig(**kwargs(**extra)))


@pytest.mark.parametrize("value", ["experts.down_proj", [1]])
def test_target_parameters_must_be_a_list_of_names(value):
    """HF: a TypeError for a string (regex matching is not implemented there), nothing for [1]."""
    with pytest.raises(ConfigError, match="target_parameters"):
        pk.LoraConfig(target_parameters=value)


def test_exclude_modules_and_layers_to_transform_do_not_apply_as_in_hf():
    base = make("mixtral")
    extra = {"layers_to_transform": [1], "exclude_modules": ["model.layers.0.mlp.experts"]}
    ours, hf = our_model(base, **extra), hf_model(base, **extra)
    assert ours.base_model.targeted_parameter_names == hf.base_model.targeted_parameter_names
    assert len(ours.base_model.targeted_parameter_names) == 4


def test_float32_adapters_on_a_bfloat16_base_give_hfs_logits(tmp_path):
    base = make("mixtral").to(torch.bfloat16)
    hf = hf_model(base)
    hf.save_pretrained(tmp_path)
    ours = pk.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    assert torch.equal(logits(ours), logits(hf))


def test_inject_adapter_in_model_with_a_state_dict_takes_parameter_targets_from_the_config():
    """HF refuses ``state_dict=`` with ``target_parameters``; ours takes the parameters from the
    config (the state dict's keys of nested layers name no module to adapt) and loads nothing."""
    base = make("mixtral")
    hf = hf_model(base)
    state = peft.get_peft_model_state_dict(hf)
    with pytest.raises(ValueError, match="target_parameters"):
        peft.inject_adapter_in_model(peft.LoraConfig(**kwargs()), copy.deepcopy(base), state_dict=state)
    model = pk.inject_adapter_in_model(pk.LoraConfig(**kwargs()), copy.deepcopy(base), state_dict=state)
    assert {f"base_model.model.{k}" for k in pk.get_peft_model_state_dict(model)} == set(state)


def test_lora_conversion_and_weighted_combinations_are_refused_as_in_hf():
    base = make("mixtral")
    ours, hf = our_model(base), hf_model(base)
    assert ours.supports_lora_conversion() is hf.supports_lora_conversion() is False
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        pk.convert_to_lora(ours, 2)
    ours.add_adapter("other", pk.LoraConfig(**kwargs()))
    with pytest.raises(ValueError, match="does not support targeting nn.Parameter"):
        ours.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="linear")


def test_merged_weights_of_a_loaded_hf_adapter_are_hfs(tmp_path):
    base = make("qwen3_moe")
    hf = hf_model(base, target_modules=["q_proj"])
    hf.save_pretrained(tmp_path)
    ours = pk.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    theirs, mine = hf.merge_and_unload().state_dict(), ours.merge_and_unload().state_dict()
    assert list(mine) == list(theirs)
    assert max((mine[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-6


def test_hotswap_and_mixed_models_take_parameter_targets(tmp_path):
    base = make("mixtral")
    first = hf_model(base)
    first.save_pretrained(tmp_path / "a")
    torch.manual_seed(5)
    second = hf_model(base)
    second.save_pretrained(tmp_path / "b")
    ours = pk.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    pk.hotswap_adapter(ours, str(tmp_path / "b"), adapter_name="default")
    assert (logits(ours) - logits(second)).abs().max() <= 1e-5
    mixed = pk.PeftMixedModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    mixed.load_adapter(tmp_path / "b", "b")
    mixed.set_adapter(["default", "b"])
    theirs = peft.PeftMixedModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    theirs.load_adapter(tmp_path / "b", "b")
    theirs.set_adapter(["default", "b"])
    assert (logits(mixed) - logits(theirs)).abs().max() <= 1e-5


def test_adapters_without_parameter_targets_join_a_model_with_them_as_in_hf():
    base = make("mixtral")
    ours, hf = our_model(base), hf_model(base)
    for model, lib in ((ours, pk), (hf, peft)):
        model.add_adapter("attn", lib.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        model.set_adapter("attn")
    assert ours.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    # (a layer's active_adapters differ: HF lists adapters a layer does not hold, the core does not)
    assert [(s.name, s.module_type, s.available_adapters) for s in ours.get_layer_status()] == \
        [(s.name, s.module_type, s.available_adapters) for s in hf.get_layer_status()]
