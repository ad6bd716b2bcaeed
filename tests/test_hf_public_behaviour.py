"""HF PEFT's generic public functions and PeftModel / tuner methods behave as HF ``peft``'s do on
the same model: same results, same trainability, same errors where HF raises."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import peft_kernel as pk
from peft_kernel_testing import make_inputs, make_model
from peft_kernel_testing.hf_oracle import max_abs_diff, perturb, run

peft = pytest.importorskip("peft")


def pair(kind="mlp", names=("default",), **config):
    """HF and ours on the same base, adapters ``names`` with the same (perturbed) weights."""
    hf = ours = None
    for i, name in enumerate(names):
        hf_cfg, our_cfg = peft.LoraConfig(init_lora_weights=False, **config), pk.LoraConfig(init_lora_weights=False, **config)
        if hf is None:
            hf = peft.get_peft_model(make_model(kind), hf_cfg, adapter_name=name)
            ours = pk.get_peft_model(make_model(kind), our_cfg, adapter_name=name)
        else:
            hf.add_adapter(name, hf_cfg)
            ours.add_adapter(name, our_cfg)
        hf.base_model.set_adapter(name)
        perturb(hf, i)
        pk.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(hf, adapter_name=name), adapter_name=name)
    hf.set_adapter(names[0])
    ours.set_adapter(names[0])
    return hf, ours


def grads(model):
    """``{parameter name: requires_grad}`` of adapter tensors and modules_to_save copies, in HF's key form."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            out[name] = p.requires_grad
    return out


# ---- status ------------------------------------------------------------------------------------
def _status(x):
    return [dataclasses.asdict(s) for s in x] if isinstance(x, list) else dataclasses.asdict(x)


@pytest.mark.parametrize("kind, targets", [("mlp", ["lin0", "lin1"]), ("conv2d", ["conv0"]), ("embedding", ["emb"]),
                                           ("gpt2-conv1d", ["c_fc"]), ("llama", ["q_proj", "v_proj"])])
def test_layer_and_model_status_match_hf(kind, targets):
    extra = {"modules_to_save": ["lin2"]} if kind == "mlp" else {}
    hf, ours = pair(kind, ("a", "b"), target_modules=targets, **extra)
    steps = [
        lambda m: None,
        lambda m: m.set_adapter("b"),
        lambda m: m.merge_adapter(),
        lambda m: m.unmerge_adapter(),
        lambda m: m.base_model.disable_adapter_layers(),
        lambda m: m.base_model.enable_adapter_layers(),
        lambda m: m.set_requires_grad("a"),
        lambda m: m.set_adapter("a", inference_mode=True),
    ]
    for step in steps:
        step(hf)
        step(ours)
        assert _status(ours.get_layer_status()) == _status(hf.get_layer_status())
        assert _status(ours.get_model_status()) == _status(hf.get_model_status())
        assert _status(pk.get_model_status(ours)) == _status(peft.get_model_status(hf))


@pytest.mark.parametrize("kind, targets", [("mlp", ["lin0", "lin1"]), ("llama", ["q_proj", "v_proj"])])
def test_disable_adapter_context_freezes_and_restores_as_hf(kind, targets):
    """Inside ``disable_adapter()`` every adapter (and modules_to_save copy) is frozen; after it the
    active ones are trainable again, inactive ones stay frozen: HF's flags, tensor by tensor."""
    extra = {"modules_to_save": ["lin2"]} if kind == "mlp" else {}
    hf, ours = pair(kind, ("a", "b"), target_modules=targets, **extra)
    assert grads(ours) == grads(hf)
    with hf.disable_adapter(), ours.disable_adapter():
        assert grads(ours) == grads(hf) and not any(grads(ours).values())
    assert grads(ours) == grads(hf) and any(grads(ours).values())


def test_status_of_a_plain_model_with_injected_adapters_matches_hf():
    hf = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["lin0"]), make_model("mlp"))
    ours = pk.inject_adapter_in_model(pk.LoraConfig(target_modules=["lin0"]), make_model("mlp"))
    assert _status(pk.get_layer_status(ours)) == _status(peft.get_layer_status(hf))
    assert _status(pk.get_model_status(ours)) == _status(peft.get_model_status(hf))
    llama_hf = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["q_proj"]), make_model("llama"))
    llama = pk.inject_adapter_in_model(pk.LoraConfig(target_modules=["q_proj"]), make_model("llama"))
    assert pk.get_model_status(llama).base_model_type == peft.get_model_status(llama_hf).base_model_type == "LlamaForCausalLM"


def test_status_errors_match_hf():
    for lib in (peft, pk):
        with pytest.raises(ValueError, match="No adapter layers found"):
            lib.get_layer_status(make_model("mlp"))
    prompt_hf = peft.get_peft_model(make_model("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    prompt = pk.get_peft_model(make_model("llama"), pk.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    for lib, model in ((peft, prompt_hf), (pk, prompt)):
        with pytest.raises(TypeError, match="prefix tuning and adaption prompt are not supported"):
            lib.get_layer_status(model)
        with pytest.raises(TypeError, match="prefix tuning and adaption prompt are not supported"):
            model.get_model_status()


# ---- trainability ------------------------------------------------------------------------------
def test_set_adapter_inference_mode_and_set_requires_grad_match_hf(tmp_path):
    hf, ours = pair("mlp", ("default", "b"), target_modules=["lin0"], modules_to_save=["lin1"])
    assert grads(ours) == grads(hf)
    for step in (lambda m: m.set_adapter("b"), lambda m: m.set_adapter("default", inference_mode=True),
                 lambda m: m.set_requires_grad("b"), lambda m: m.set_requires_grad(["b", "default"]),
                 lambda m: m.set_requires_grad("default", requires_grad=False), lambda m: m.set_adapter("b")):
        step(hf)
        step(ours)
        assert grads(ours) == grads(hf)
    hf.save_pretrained(tmp_path)
    hf_loaded = peft.PeftModel.from_pretrained(make_model("mlp"), tmp_path)
    loaded = pk.PeftModel.from_pretrained(make_model("mlp"), tmp_path)
    assert grads(loaded) == grads(hf_loaded) and not loaded.training
    for m in (hf_loaded, loaded):  # HF: set_adapter makes an adapter loaded for inference trainable
        m.set_adapter("default")
    assert grads(loaded) == grads(hf_loaded)
    for m in (hf_loaded, loaded):  # a new adapter loaded with is_trainable=True gets gradients, inactive or not
        m.load_adapter(tmp_path / "b", "b", is_trainable=True)
    assert grads(loaded) == grads(hf_loaded)
    with pytest.raises(Exception, match="not found|unknown"):
        ours.set_requires_grad("nope")


def test_set_requires_grad_refused_for_prompt_learning_as_hf():
    for lib in (peft, pk):
        model = lib.get_peft_model(make_model("llama"), lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        with pytest.raises(TypeError, match="Setting `requires_grad` is not supported for prompt learning"):
            model.set_requires_grad("default")


def test_disable_adapter_layers_warns_about_bias_as_hf():
    for lib in (peft, pk):
        model = lib.get_peft_model(make_model("mlp"), lib.LoraConfig(target_modules=["lin0"], bias="lora_only"))
        with pytest.warns(UserWarning, match="disabling adapter layers with bias configured to be 'lora_only'"):
            model.base_model.disable_adapter_layers()


# ---- forward / generate ------------------------------------------------------------------------
def test_task_class_forward_takes_hf_named_parameters():
    hf, ours = pair("llama", target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    assert type(ours).__name__ == "PeftModelForCausalLM"
    ids = make_inputs("llama")["input_ids"]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        theirs = hf(ids, mask, labels=ids, return_dict=True)
        mine = ours(ids, mask, labels=ids, return_dict=True)  # input_ids and attention_mask positionally, as HF
    assert max_abs_diff(mine.logits, theirs.logits) <= 1e-5
    assert abs(mine.loss.item() - theirs.loss.item()) <= 1e-5
    ours.eval()
    with torch.no_grad():  # adapter_names travels in **kwargs (HF's special_peft_forward_args)
        mixed = ours(input_ids=ids, adapter_names=["default"] * ids.shape[0]).logits
    assert max_abs_diff(mixed, theirs.logits) <= 1e-5
    with torch.no_grad():  # named parameters and other keywords reach the model
        theirs = hf(input_ids=ids, output_hidden_states=True, use_cache=False)
        mine = ours(input_ids=ids, output_hidden_states=True, use_cache=False)
    assert len(mine.hidden_states) == len(theirs.hidden_states) and mine.past_key_values is None


def test_seq2seq_forward_and_keyword_generate_match_hf():
    hf, ours = pair("t5", target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    inputs = make_inputs("t5")
    assert max_abs_diff(run(ours, inputs), run(hf, inputs)) <= 1e-5
    kwargs = dict(input_ids=inputs["input_ids"], max_new_tokens=4, do_sample=False)
    assert torch.equal(ours.generate(**kwargs), hf.generate(**kwargs))
    with pytest.raises(TypeError):
        ours.generate(inputs["input_ids"])  # HF's Seq2Seq generate takes keywords only


@pytest.mark.skipif(int(__import__("transformers").__version__.split(".")[0]) < 5,
                    reason="on transformers 4.x HF peft also drops cache_position from the base model's inputs; "
                           "generate itself is compared with HF's on every version")
def test_prepare_inputs_for_generation_delegates_as_hf():
    hf, ours = pair("llama", target_modules=["q_proj"], task_type="CAUSAL_LM")
    ids = make_inputs("llama")["input_ids"]
    a, b = hf.prepare_inputs_for_generation(ids), ours.prepare_inputs_for_generation(ids)
    assert set(a) == set(b) and torch.equal(a["input_ids"], b["input_ids"])


# ---- load / save keywords ----------------------------------------------------------------------
def test_unknown_load_keywords_raise_type_error(tmp_path):
    _, ours = pair("mlp", target_modules=["lin0"])
    ours.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="'revison'"):
        pk.PeftModel.from_pretrained(make_model("mlp"), tmp_path, revison="main")
    loaded = pk.PeftModel.from_pretrained(make_model("mlp"), tmp_path)
    with pytest.raises(TypeError, match="'is_trainble'"):
        loaded.load_adapter(tmp_path, "other", is_trainble=True)
    assert list(loaded.peft_config) == ["default"]
    with pytest.raises(TypeError, match="'forced_download'"):
        pk.load_peft_weights(tmp_path, forced_download=True)
    with pytest.raises(TypeError, match="'bogus'"):
        pk.PeftModelForCausalLM(make_model("llama"), pk.LoraConfig(target_modules=["q_proj"]), bogus=1)
    # what HF accepts keeps working: Hub keywords, torch_device, use_auth_token, ignore_mismatched_sizes
    again = pk.PeftModel.from_pretrained(make_model("mlp"), tmp_path, torch_device="cpu", local_files_only=True,
                                         use_auth_token=None, ignore_mismatched_sizes=False)
    inputs = make_inputs("mlp")
    assert max_abs_diff(run(again, inputs), run(ours.eval(), inputs)) == 0


def test_load_peft_weights_and_key_mapping_match_hf(tmp_path):
    hf, _ = pair("mlp", target_modules=["lin0", "lin1"])
    hf.save_pretrained(tmp_path)
    theirs, mine = peft.load_peft_weights(str(tmp_path), device="cpu"), pk.load_peft_weights(tmp_path, device="cpu")
    assert sorted(theirs) == sorted(mine) and all(torch.equal(theirs[k], mine[k]) for k in theirs)
    mapping = {r"^lin0\.": "renamed.", r"lora_A": "lora_Z"}
    theirs = peft.load_peft_weights(str(tmp_path), device="cpu", key_mapping=mapping)
    mine = pk.load_peft_weights(tmp_path, device="cpu", key_mapping=mapping)
    assert sorted(theirs) == sorted(mine) and all(torch.equal(theirs[k], mine[k]) for k in theirs)
    assert any(".renamed." in k for k in mine)
    # key_mapping through from_pretrained: a checkpoint saved under other module names loads
    ours = pk.PeftModel.from_pretrained(make_model("mlp"), tmp_path, key_mapping={r"^nothing": "x"})
    hf_loaded = peft.PeftModel.from_pretrained(make_model("mlp"), str(tmp_path), key_mapping={r"^nothing": "x"})
    inputs = make_inputs("mlp")
    assert max_abs_diff(run(ours, inputs), run(hf_loaded, inputs)) <= 1e-6


def test_get_peft_config_and_tables_match_hf():
    data = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
    theirs, mine = peft.get_peft_config(dict(data)), pk.get_peft_config(dict(data))
    assert type(mine).__name__ == type(theirs).__name__ == "LoraConfig"
    assert (mine.r, mine.lora_alpha, mine.target_modules, str(mine.task_type)) == (4, 16, {"q_proj"}, "CAUSAL_LM")
    assert pk.PEFT_TYPE_TO_CONFIG_MAPPING["LORA"] is pk.LoraConfig
    assert pk.PEFT_TYPE_TO_CONFIG_MAPPING[pk.PeftType.LORA] is pk.LoraConfig
    assert pk.PEFT_TYPE_TO_TUNER_MAPPING["LORA"].__name__ == peft.PEFT_TYPE_TO_TUNER_MAPPING["LORA"].__name__
    assert "LORA" in pk.PEFT_TYPE_TO_CONFIG_MAPPING and len(pk.PEFT_TYPE_TO_CONFIG_MAPPING) >= 1
    assert {k: v.__name__ for k, v in pk.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items()} == {
        k: v.__name__ for k, v in peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items()}
    assert pk.TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING == peft.TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING


def test_errors_and_warning_names():
    assert issubclass(pk.NoMatchingPeftModuleError, pk.PeftError) and issubclass(pk.NoMatchingPeftModuleError, ValueError)
    assert issubclass(pk.PeftWarning, UserWarning)
    with pytest.raises(pk.NoMatchingPeftModuleError):
        pk.get_peft_model(make_model("mlp"), pk.LoraConfig(target_modules=["absent"]))


# ---- base-model state dicts --------------------------------------------------------------------
def test_base_model_state_dict_matches_hf():
    hf, ours = pair("mlp", ("a", "b"), target_modules=["lin0"], modules_to_save=["lin2"])
    theirs, mine = peft.get_base_model_state_dict(hf), pk.get_base_model_state_dict(ours)
    assert sorted(theirs) == sorted(mine) == sorted(make_model("mlp").state_dict())
    assert all(torch.equal(theirs[k], mine[k]) for k in theirs)
    fresh = {k: torch.randn_like(v) for k, v in mine.items()}
    r_hf, r_ours = peft.set_base_model_state_dict(hf, fresh), pk.set_base_model_state_dict(ours, fresh)
    assert tuple(r_ours) == tuple(r_hf) == ([], [])
    inputs = make_inputs("mlp")
    assert max_abs_diff(run(ours, inputs), run(hf, inputs)) <= 1e-5
    broken = dict(fresh, extra=torch.zeros(1))
    del broken["lin1.bias"]
    for lib, model in ((peft, hf), (pk, ours)):
        with pytest.raises(RuntimeError, match=r"Missing key\(s\).*lin1\.bias"):
            lib.set_base_model_state_dict(model, broken)
    r_hf, r_ours = peft.set_base_model_state_dict(hf, broken, strict=False), pk.set_base_model_state_dict(ours, broken, strict=False)
    assert (r_ours.missing_keys, r_ours.unexpected_keys) == (r_hf.missing_keys, r_hf.unexpected_keys)


# ---- training utilities ------------------------------------------------------------------------
def test_prepare_model_for_kbit_training_matches_hf():
    models = []
    for lib in (peft, pk):
        model = make_model("llama").to(torch.bfloat16)
        out = lib.prepare_model_for_kbit_training(model)
        assert out is model
        models.append(model)
    hf_m, ours_m = models
    assert {n: (p.dtype, p.requires_grad) for n, p in ours_m.named_parameters()} == {
        n: (p.dtype, p.requires_grad) for n, p in hf_m.named_parameters()}
    # a "quantized" model gets gradient checkpointing and input grads, as in HF
    for lib in (peft, pk):
        model = make_model("llama")
        model.is_loaded_in_8bit = True
        lib.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": True})
        models.append(model)
    assert models[2].is_gradient_checkpointing == models[3].is_gradient_checkpointing is True


def test_cast_mixed_precision_params_matches_hf():
    hf, ours = pair("mlp", target_modules=["lin0"])
    peft.cast_mixed_precision_params(hf, torch.bfloat16)
    pk.cast_mixed_precision_params(ours, torch.bfloat16)
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in hf.named_parameters()}


def test_shift_tokens_right_and_bloom_reshape_match_hf():
    ids = torch.tensor([[5, 6, -100, 7], [1, -100, -100, 2]])
    assert torch.equal(pk.shift_tokens_right(ids, 0, 3), peft.shift_tokens_right(ids, 0, 3))
    for lib in (peft, pk):
        with pytest.raises(ValueError, match="pad_token_id has to be defined"):
            lib.shift_tokens_right(ids, None, 3)
    kv = tuple(torch.randn(2, 3, 4, 5, 6) for _ in range(2))  # 4 "layers" of [batch, heads, tokens, head_dim]
    theirs, mine = peft.bloom_model_postprocess_past_key_value(kv), pk.bloom_model_postprocess_past_key_value(kv)
    assert len(theirs) == len(mine) and all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(theirs, mine))


# ---- model card, prompts, tuner helpers -------------------------------------------------------
def test_model_card_matches_hf(tmp_path):
    from huggingface_hub import ModelCard

    hf, ours = pair("llama", target_modules=["q_proj"], task_type="CAUSAL_LM")
    hf.create_or_update_model_card(str(tmp_path / "hf"))
    ours.create_or_update_model_card(str(tmp_path / "ours"))
    ours.create_or_update_model_card(str(tmp_path / "ours"))  # updating keeps one version block
    theirs, mine = ModelCard.load(tmp_path / "hf" / "README.md"), ModelCard.load(tmp_path / "ours" / "README.md")
    for key in ("library_name", "tags", "pipeline_tag", "base_model"):
        assert mine.data.to_dict().get(key) == theirs.data.to_dict().get(key), key
    assert mine.text.count("### Framework versions") == 1 and "- PEFT 0.21.2" in mine.text


def test_push_to_hub_uploads_the_saved_adapter(monkeypatch):
    from huggingface_hub import HfApi

    seen = {}

    class Repo:
        repo_id = "someone/adapter"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        import os

        seen.update(repo_id=repo_id, files=sorted(os.listdir(folder_path)), kwargs=kwargs)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: Repo())
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    _, ours = pair("mlp", target_modules=["lin0"])
    assert ours.push_to_hub("adapter", commit_message="hi", tags=["x"]) == "commit-info"
    assert seen["repo_id"] == "someone/adapter"
    assert seen["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert seen["kwargs"]["commit_message"] == "hi"


def test_get_prompt_and_prompt_embedding_match_hf():
    torch.manual_seed(0)
    hf = peft.get_peft_model(make_model("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ours = pk.get_peft_model(make_model("llama"), pk.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    pk.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(hf))
    assert torch.equal(ours.get_prompt_embedding_to_save("default"), hf.get_prompt_embedding_to_save("default"))
    assert max_abs_diff(ours.get_prompt(batch_size=2), hf.get_prompt(batch_size=2)) == 0
    _, layered = pair("mlp", target_modules=["lin0"])
    with pytest.raises(TypeError, match="prompt-learning"):
        layered.get_prompt(1)
    assert ours.supports_lora_conversion() is hf.supports_lora_conversion() is False


def test_tuner_get_model_config_and_inject_adapter_match_hf():
    for kind in ("mlp", "llama"):
        model = make_model(kind)
        assert pk.LoraModel.get_model_config(model) == peft.LoraModel.get_model_config(model)
    hf, ours = pair("mlp", target_modules=["lin0"])
    for lib, model in ((peft, hf), (pk, ours)):  # HF's way: put the config in, then inject_adapter
        model.base_model.peft_config["extra"] = lib.LoraConfig(target_modules=["lin1"])
        model.base_model.inject_adapter(model.base_model.model, "extra")
    assert sorted(n for n in grads(ours)) == sorted(n for n in grads(hf))


def test_inject_adapter_in_model_with_state_dict_targets_its_modules():
    source = peft.get_peft_model(make_model("mlp"), peft.LoraConfig(target_modules=["lin0", "lin1"]))
    keys = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(source).items()}
    with warnings.catch_warnings(record=True) as hf_warned:
        warnings.simplefilter("always")
        hf = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["lin0"]), make_model("mlp"), state_dict=keys)
    with pytest.warns(UserWarning, match=r"additional target modules: \['lin1'\]"):
        ours = pk.inject_adapter_in_model(pk.LoraConfig(target_modules=["lin0"]), make_model("mlp"), state_dict=keys)
    assert any("lin1" in str(w.message) for w in hf_warned)
    assert sorted(n for n in grads(ours)) == sorted(n for n in grads(hf))


def test_task_classes_accept_hf_init_keywords():
    model = pk.PeftModelForTokenClassification(make_model("bert"), pk.LoraConfig(target_modules=["query"]),
                                               autocast_adapter_dtype=False, low_cpu_mem_usage=False)
    assert model.active_adapters == ["default"]
    with pytest.raises(TypeError, match="peft_config"):
        pk.PeftModelForTokenClassification(make_model("bert"))


def test_auto_peft_model_import_allowlist_as_hf(tmp_path):
    model = pk.get_peft_model(make_model("mlp"), pk.LoraConfig(target_modules=["lin0"],
                                                                 base_model_name_or_path=str(tmp_path / "base")))
    model.save_pretrained(tmp_path / "adapter")
    config = pk.PeftConfig.from_pretrained(tmp_path / "adapter")
    assert config.auto_mapping["parent_library"] == "peft_kernel_testing.models"
    with pytest.raises(ValueError, match="not in the import allowlist"):
        pk.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    # allowed: the class is imported (an nn.Module without from_pretrained then fails, as it would in HF)
    with pytest.raises(AttributeError, match="from_pretrained"):
        pk.AutoPeftModel.from_pretrained(tmp_path / "adapter", import_allowlist=["peft_kernel_testing"])
