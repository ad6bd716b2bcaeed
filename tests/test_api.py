"""HF PEFT's public API, checked side by side against HF ``peft`` on the same weights."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

import peft_kernel as pk
from peft_kernel import LoraConfig, PeftModel, get_peft_model
from peft_kernel.errors import CheckpointError
from peft_kernel_testing import make_inputs, make_model, output_tensor

peft = pytest.importorskip("peft")


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def out(model, inputs, **kw):
    with torch.no_grad():
        return output_tensor(model(**inputs, **kw))


def hf_and_ours(kind, tmp_path, names=("default",), **config):
    """An HF peft model with adapters ``names`` (perturbed), saved; ours loaded from the same files."""
    hf = None
    for i, name in enumerate(names):
        cfg = peft.LoraConfig(init_lora_weights=False, **config)
        if hf is None:
            hf = peft.get_peft_model(make_model(kind), cfg, adapter_name=name)
        else:
            hf.add_adapter(name, cfg)
        hf.set_adapter(name)
        perturb(hf, i)
    hf.set_adapter(names[0])
    hf.eval()
    hf.save_pretrained(tmp_path)
    ours = None
    for name in names:
        path = tmp_path if name == "default" else tmp_path / name
        if ours is None:
            ours = PeftModel.from_pretrained(make_model(kind), path, adapter_name=name)
        else:
            ours.load_adapter(path, adapter_name=name)
    return hf, ours


def test_public_names_exist():
    for name in ["get_peft_model", "PeftModel", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
                 "PeftModelForTokenClassification", "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction",
                 "AutoPeftModel", "AutoPeftModelForCausalLM", "PeftConfig", "LoraConfig", "PeftType", "TaskType",
                 "inject_adapter_in_model", "get_peft_model_state_dict", "set_peft_model_state_dict", "hotswap_adapter",
                 "check_if_peft_model", "rescale_adapter_scale"]:
        assert getattr(pk, name) is not None


def test_trainable_parameter_report_matches_hf():
    config = dict(target_modules=["q_proj", "v_proj"], r=4, task_type="SEQ_CLS")
    ours = get_peft_model(make_model("bert"), LoraConfig(**{**config, "target_modules": ["query", "value"]}))
    theirs = peft.get_peft_model(make_model("bert"), peft.LoraConfig(**{**config, "target_modules": ["query", "value"]}))
    assert type(ours).__name__ == type(theirs).__name__ == "PeftModelForSequenceClassification"
    assert type(ours.base_model).__name__ == "LoraModel"
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    texts = []
    for model in (ours, theirs):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            model.print_trainable_parameters()
        texts.append(buffer.getvalue())
    assert texts[0] == texts[1]
    assert sorted(ours.peft_config["default"].modules_to_save) == sorted(theirs.peft_config["default"].modules_to_save)


def test_several_active_adapters_add_up_like_hf(tmp_path):
    hf, ours = hf_and_ours("llama", tmp_path, names=("default", "b"), target_modules=["q_proj", "v_proj", "down_proj"])
    inputs = make_inputs("llama")
    hf.base_model.set_adapter(["default", "b"])
    ours.set_adapter(["default", "b"])
    assert ours.active_adapters == ["default", "b"]
    torch.testing.assert_close(out(ours, inputs), out(hf, inputs), atol=1e-5, rtol=0)


def test_mixed_batch_and_generate_match_hf(tmp_path):
    hf, ours = hf_and_ours("llama", tmp_path, names=("default", "b", "c"), target_modules="all-linear")
    inputs = make_inputs("llama")
    names = ["c", "__base__", "default", "b"]
    torch.testing.assert_close(out(ours, inputs, adapter_names=names), out(hf, inputs, adapter_names=names), atol=1e-5, rtol=0)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    ours_gen = ours.generate(input_ids=inputs["input_ids"], adapter_names=names, **kwargs)
    hf_gen = hf.generate(input_ids=inputs["input_ids"], adapter_names=names, **kwargs)
    assert torch.equal(ours_gen, hf_gen)
    for row, name in enumerate(names):
        if name == "__base__":
            with ours.disable_adapter():
                alone = ours.generate(input_ids=inputs["input_ids"][row:row + 1], **kwargs)
        else:
            ours.set_adapter(name)
            alone = ours.generate(input_ids=inputs["input_ids"][row:row + 1], **kwargs)
        n = alone.shape[1]  # a row that hit EOS alone is padded in the batch
        assert torch.equal(ours_gen[row, :n], alone[0]), f"row {row} ({name})"
        assert (ours_gen[row, n:] == 0).all()


def test_beam_search_with_adapter_names(tmp_path):
    _, ours = hf_and_ours("llama", tmp_path, names=("default", "b"), target_modules=["q_proj", "v_proj"])
    ids = make_inputs("llama")["input_ids"][:2]
    kwargs = dict(max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    mixed = ours.generate(input_ids=ids, adapter_names=["b", "default"], **kwargs)
    ours.set_adapter("b")
    assert torch.equal(mixed[0], ours.generate(input_ids=ids[:1], **kwargs)[0])


def test_merge_and_unload_selected_adapter_matches_hf(tmp_path):
    hf, ours = hf_and_ours("llama", tmp_path, names=("default", "b"), target_modules=["q_proj", "o_proj"], use_dora=True)
    inputs = make_inputs("llama")
    hf_merged = hf.merge_and_unload(adapter_names=["b"])
    ours_merged = ours.merge_and_unload(adapter_names=["b"], progressbar=True)
    assert type(ours_merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in ours_merged.named_parameters())
    torch.testing.assert_close(out(ours_merged, inputs), out(hf_merged, inputs), atol=1e-5, rtol=0)


def test_multi_adapter_folders_load_both_ways(tmp_path):
    hf, ours = hf_and_ours("gpt2", tmp_path / "hf", names=("default", "other"), target_modules=["c_attn"])
    assert (tmp_path / "hf" / "other" / "adapter_model.safetensors").exists()
    inputs = make_inputs("gpt2")
    for name in ("default", "other"):
        hf.set_adapter(name)
        ours.set_adapter(name)
        torch.testing.assert_close(out(ours, inputs), out(hf, inputs), atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "ours", selected_adapters=["other"])
    assert not (tmp_path / "ours" / "adapter_config.json").exists()
    back = peft.PeftModel.from_pretrained(make_model("gpt2"), tmp_path / "ours" / "other").eval()
    torch.testing.assert_close(out(back, inputs), out(ours, inputs), atol=1e-5, rtol=0)
    # subfolder argument, as HF's load_adapter takes it
    again = PeftModel.from_pretrained(make_model("gpt2"), tmp_path / "hf")
    again.load_adapter(tmp_path / "hf", adapter_name="other", subfolder="other")
    again.set_adapter("other")
    torch.testing.assert_close(out(again, inputs), out(ours, inputs), atol=1e-6, rtol=0)


def test_inject_and_state_dict_functions_match_hf():
    config = dict(target_modules=["lin0", "lin1"], r=4, init_lora_weights=False)
    ours = pk.inject_adapter_in_model(LoraConfig(**config), make_model("mlp"))
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), make_model("mlp"))
    ours_sd = pk.get_peft_model_state_dict(ours)
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    assert set(ours_sd) == set(theirs_sd)
    assert all(ours_sd[k].shape == theirs_sd[k].shape for k in ours_sd)
    result = pk.set_peft_model_state_dict(ours, theirs_sd)
    assert result.unexpected_keys == [] and result.missing_keys == []
    x = make_inputs("mlp")["x"]
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {n for n, p in theirs.named_parameters() if p.requires_grad}


def test_hotswap_adapter(tmp_path):
    for seed, name in ((0, "a"), (1, "b")):
        model = get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8 + 8 * seed))
        perturb(model, seed)
        model.save_pretrained(tmp_path / name)
    inputs = make_inputs("llama")
    expected = out(PeftModel.from_pretrained(make_model("llama"), tmp_path / "b"), inputs)
    model = PeftModel.from_pretrained(make_model("llama"), tmp_path / "a")
    layer_ids = {id(m) for m in model.modules()}
    pk.hotswap_adapter(model, tmp_path / "b", adapter_name="default")
    torch.testing.assert_close(out(model, inputs), expected, atol=1e-6, rtol=0)
    assert {id(m) for m in model.modules()} == layer_ids, "hotswap must not replace modules"
    assert model.peft_config["default"].lora_alpha == 16
    other = get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj", "v_proj"], r=2))
    other.save_pretrained(tmp_path / "r2")
    with pytest.raises(CheckpointError, match="same rank"):
        pk.hotswap_adapter(model, tmp_path / "r2", adapter_name="default")


def test_rescale_adapter_scale_matches_hf(tmp_path):
    from peft.helpers import rescale_adapter_scale as hf_rescale

    hf, ours = hf_and_ours("mlp", tmp_path, target_modules=["lin0", "lin1"])
    inputs = make_inputs("mlp")
    before = out(ours, inputs)
    with pk.rescale_adapter_scale(ours, 0.5), hf_rescale(hf, 0.5):
        torch.testing.assert_close(out(ours, inputs), out(hf, inputs), atol=1e-6, rtol=0)
        assert not torch.allclose(out(ours, inputs), before)
    torch.testing.assert_close(out(ours, inputs), before)


def test_check_if_peft_model(tmp_path):
    get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"])).save_pretrained(tmp_path / "a")
    assert pk.check_if_peft_model(tmp_path / "a")
    assert not pk.check_if_peft_model(tmp_path)
    assert not pk.check_if_peft_model(tmp_path / "missing")


def test_trainable_flag_and_adapter_lifecycle(tmp_path):
    model = get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"]))
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(make_model("mlp"), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.training
    trainable = PeftModel.from_pretrained(make_model("mlp"), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        "base_model.model.lin0.lora_A.default.weight", "base_model.model.lin0.lora_B.default.weight"}
    trainable.add_adapter("b", LoraConfig(target_modules=["lin1"]))
    assert trainable.active_adapter == "default"
    trainable.set_adapter("b")
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        "base_model.model.lin1.lora_A.b.weight", "base_model.model.lin1.lora_B.b.weight"}
    trainable.delete_adapter("b")
    assert trainable.active_adapter == "default" and list(trainable.peft_config) == ["default"]
    base = trainable.unload()
    assert type(base).__name__ == "MLP" and not any("lora" in n for n, _ in base.named_parameters())


def test_auto_peft_model_loads_base_and_adapter(tmp_path):
    base = make_model("llama")
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM",
                                                             base_model_name_or_path=str(tmp_path / "base")))
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    inputs = make_inputs("llama")
    for cls in (pk.AutoPeftModelForCausalLM, pk.AutoPeftModel):
        loaded = cls.from_pretrained(tmp_path / "adapter")
        assert type(loaded).__name__ == "PeftModelForCausalLM"
        torch.testing.assert_close(out(loaded, inputs), out(model.eval(), inputs), atol=1e-6, rtol=0)


def test_hub_repo_id_loads_offline_from_cache(tmp_path):
    model = get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"], init_lora_weights=False)).eval()
    model.save_pretrained(tmp_path / "saved")
    snapshot = tmp_path / "cache" / "models--someone--mlp-lora" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (snapshot / name).write_bytes((tmp_path / "saved" / name).read_bytes())
    refs = tmp_path / "cache" / "models--someone--mlp-lora" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    loaded = PeftModel.from_pretrained(make_model("mlp"), "someone/mlp-lora", cache_dir=str(tmp_path / "cache"), local_files_only=True)
    inputs = make_inputs("mlp")
    torch.testing.assert_close(out(loaded, inputs), out(model, inputs))
    with pytest.raises(CheckpointError, match="someone/absent"):
        PeftModel.from_pretrained(make_model("mlp"), "someone/absent", cache_dir=str(tmp_path / "cache"), local_files_only=True)
