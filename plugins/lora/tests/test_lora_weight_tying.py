"""``ensure_weight_tying``: adapters on a tied input embedding / output layer stay tied (HF PEFT's
layouts: shared ``modules_to_save`` copies, LoRA tensors of the output layer as transposed views of
the embedding's), cross-load with HF both ways, merge once (HF PEFT 0.21.2 folds the shared delta
into the shared weight twice), mixed batches, and HF's warnings."""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch
from torch import nn

import peft_kernel

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(0))
CASES = {
    "mts-embed": {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
    "mts-lm-head": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "lora-lm-head": {"target_modules": ["q_proj", "lm_head"]},
    "lora-embed": {"target_modules": ["q_proj", "embed_tokens"]},
}


def _llama(tie: bool = True) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, pad_token_id=0, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def _build(lib, case: str, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = lib.LoraConfig(r=4, ensure_weight_tying=True, **{k: list(v) for k, v in CASES[case].items()}, **kwargs)
        return lib.get_peft_model(_llama(), config).eval()


def _perturb(model: nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" in name and "lm_head" not in name:  # lm_head's LoRA follows the embedding's
                p.add_(torch.randn_like(p) * 0.3)


def _logits(model: nn.Module, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, **kwargs).logits


def _embedding_and_head(model):
    inner = model.base_model.model
    return inner.model.embed_tokens, inner.lm_head


@pytest.mark.parametrize("case", list(CASES))
def test_same_layout_as_hf_and_cross_load(case):
    ours, theirs = _build(peft_kernel, case), _build(peft, case)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert type(_embedding_and_head(ours)[1]).__name__ == type(_embedding_and_head(theirs)[1]).__name__
    _perturb(ours)
    expected = _logits(ours)
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = peft.PeftModel.from_pretrained(_llama(), folder).eval()
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=1e-5)
    _perturb(theirs)
    expected = _logits(theirs)
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = peft_kernel.PeftModel.from_pretrained(_llama(), folder).eval()
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=1e-5)
    assert set(peft.get_peft_model_state_dict(theirs)) <= set(peft_kernel.get_peft_model_state_dict(loaded))


@pytest.mark.parametrize("case", ["mts-embed", "lora-lm-head"])
def test_tied_after_a_training_step(case):
    model = _build(peft_kernel, case)
    _perturb(model)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(IDS, labels=IDS).loss.backward()
    optimizer.step()
    embedding, head = _embedding_and_head(model)
    if case == "mts-embed":
        assert head.modules_to_save["default"].weight is embedding.modules_to_save["default"].weight
    else:
        assert torch.equal(head.lora_A["default"].weight, embedding.lora_embedding_B["default"].T)
        assert torch.equal(head.lora_B["default"].weight, embedding.lora_embedding_A["default"].T)


@pytest.mark.parametrize("case", ["lora-lm-head", "lora-embed"])
def test_merge_folds_the_shared_delta_once(case):
    """The independent oracle is the unmerged model: HF PEFT 0.21.2's merged logits are off by
    ~100 here (both tied layers add the same delta to the one shared weight)."""
    model = _build(peft_kernel, case)
    _perturb(model)
    unmerged = _logits(model)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model), unmerged, atol=1e-4, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model), unmerged, atol=1e-4, rtol=1e-5)
    embedding, head = _embedding_and_head(model)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(_logits_plain(merged), unmerged, atol=1e-4, rtol=1e-5)


def _logits_plain(model):
    with torch.no_grad():
        return model(IDS).logits


def test_mixed_batch_rows_equal_single_runs():
    model = _build(peft_kernel, "lora-lm-head")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("other", peft_kernel.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], ensure_weight_tying=True))
    _perturb(model)
    singles = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        singles[name] = _logits(model)
    with model.disable_adapter():
        singles["__base__"] = _logits(model)
    names = ["other", "__base__", "default"]
    mixed = _logits(model, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-5, rtol=1e-5)
    model.delete_adapter("other")
    assert "other" not in _embedding_and_head(model)[1].tied_adapters


def test_warnings_as_hf():
    with pytest.warns(UserWarning, match="no tied modules were found in the model"):
        peft_kernel.get_peft_model(_llama(tie=False), peft_kernel.LoraConfig(
            r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True))
    with pytest.warns(UserWarning, match="no tied modules are added in either `modules_to_save` or `target_modules`"):
        peft_kernel.get_peft_model(_llama(), peft_kernel.LoraConfig(r=2, target_modules=["q_proj"], ensure_weight_tying=True))
    with pytest.warns(UserWarning, match="no tied modules are added"):  # trainable tokens tie by themselves (HF warns too)
        peft_kernel.get_peft_model(_llama(), peft_kernel.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2],
                                                                   ensure_weight_tying=True))
    with pytest.warns(UserWarning, match="a tied layer is part of the adapter, but `ensure_weight_tying` is not set"):
        peft_kernel.get_peft_model(_llama(), peft_kernel.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))


def test_dora_on_tied_layers_refused():
    with pytest.raises(ValueError, match="cannot tie DoRA adapters"):
        peft_kernel.get_peft_model(_llama(), peft_kernel.LoraConfig(r=2, target_modules=["lm_head"], use_dora=True,
                                                                   ensure_weight_tying=True))


def test_gpt2_tied_when_the_embedding_is_named():
    """HF PEFT 0.21.2 on GPT-2 ties only when ``lm_head`` is named: naming ``wte`` warns "no tied modules
    are added" and leaves ``lm_head`` on the bare weight (logits ~100 off a tied model here). Ours
    ties whenever a tied layer is named; the oracle is the tied model itself: the output layer uses
    the adapted embedding weight, so merge_and_unload keeps one weight and equals the unmerged model."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32, vocab_size=64)
    model = peft_kernel.get_peft_model(transformers.GPT2LMHeadModel(config).eval(), peft_kernel.LoraConfig(
        r=4, target_modules=["c_attn", "wte"], ensure_weight_tying=True)).eval()
    _perturb(model)
    head, wte = model.base_model.model.lm_head, model.base_model.model.transformer.wte
    assert "default" in head.tied_adapters
    torch.testing.assert_close(head.delta_weight("default"), wte.delta_weight("default"))
    unmerged = _logits(model)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.transformer.wte.weight
    torch.testing.assert_close(_logits_plain(merged), unmerged, atol=1e-4, rtol=1e-5)


def test_inject_adapter_in_model_ties_too():
    """As HF: the tying also happens without a PeftModel (the core's ``peft_kernel_adapter_injected``)."""
    model = peft_kernel.inject_adapter_in_model(peft_kernel.LoraConfig(
        r=2, target_modules=["q_proj", "lm_head"], ensure_weight_tying=True), _llama())
    assert model.lm_head.lora_A["default"].weight.data_ptr() == model.model.embed_tokens.lora_embedding_B["default"].data_ptr()
    model = peft_kernel.inject_adapter_in_model(peft_kernel.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True), _llama())
    assert model.lm_head.modules_to_save["default"].weight is model.model.embed_tokens.modules_to_save["default"].weight
