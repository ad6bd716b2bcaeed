"""Trainable Tokens specifics: tied embeddings share one row parameter (trained once, saved under
each layer's key as HF does), merge writes the rows and unmerge restores the originals exactly,
only the selected tokens change, bad token ids are named errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import peft_kernel as pk
from peft_kernel.plugin_api import ConfigError
from peft_kernel_testing import make_model

TOKENS = [1, 3, 5]


def _tied_model():
    model = pk.get_peft_model(make_model("gpt2"), pk.TrainableTokensConfig(token_indices=TOKENS))
    with torch.no_grad():
        model.base_model.model.transformer.wte.trainable_tokens_delta["default"].add_(1.0)
    return model.eval()


def test_tied_layers_share_one_parameter_saved_under_each_key(tmp_path):
    model = _tied_model()
    wte, lm_head = model.base_model.model.transformer.wte, model.base_model.model.lm_head
    assert wte.trainable_tokens_delta["default"] is lm_head.trainable_tokens_delta["default"]
    assert model.get_nb_trainable_parameters()[0] == len(TOKENS) * 16
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(saved) == ["base_model.model.lm_head.trainable_tokens_delta",
                             "base_model.model.transformer.wte.trainable_tokens_delta"]
    loaded = pk.PeftModel.from_pretrained(make_model("gpt2"), tmp_path)
    lw, ll = loaded.base_model.model.transformer.wte, loaded.base_model.model.lm_head
    assert lw.trainable_tokens_delta["default"] is ll.trainable_tokens_delta["default"]
    torch.testing.assert_close(lw.trainable_tokens_delta["default"], wte.trainable_tokens_delta["default"])


def test_only_the_selected_tokens_change():
    model = _tied_model()
    base = make_model("gpt2").eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    ours = model.base_model.model.transformer.wte(ids)
    theirs = base.transformer.wte(ids)
    changed = (ours - theirs).abs().amax(-1)[0] > 0
    assert changed.tolist() == [True, False, True, False, True, False]
    hidden = torch.randn(2, 16)
    logits, base_logits = model.base_model.model.lm_head(hidden), base.lm_head(hidden)
    assert ((logits - base_logits).abs().amax(0) > 0).nonzero().flatten().tolist() == TOKENS


def test_merge_writes_rows_and_unmerge_restores_them_exactly():
    model = _tied_model()
    weight = model.base_model.model.transformer.wte.base_layer.weight
    original = weight.detach().clone()
    ids = torch.randint(0, 64, (2, 6))
    expected = model(input_ids=ids).logits
    model.merge_adapter()
    torch.testing.assert_close(weight[TOKENS], model.base_model.model.transformer.wte.trainable_tokens_delta["default"])
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
    model.unmerge_adapter()
    assert torch.equal(weight, original)


@pytest.mark.parametrize("indices, match", [
    ([], "non-empty"), ([1, 1], "duplicates"), ([-1], "non-negative"), ([1.5], "int"), ("1", "list"),
])
def test_bad_token_indices_are_named(indices, match):
    with pytest.raises(ConfigError, match=match):
        pk.TrainableTokensConfig(token_indices=indices)


def test_token_outside_the_vocabulary_is_named_and_leaves_the_model_as_it_was():
    base = make_model("llama")
    before = {n: p.clone() for n, p in base.named_parameters()}
    with pytest.raises(ConfigError, match=r"token_indices \[64\] are out of range for 'model.embed_tokens'"):
        pk.get_peft_model(base, pk.TrainableTokensConfig(token_indices=[1, 64]))
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    assert type(base.model.embed_tokens).__name__ == "Embedding"


def _tiny_gemma3():
    import transformers

    config = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                           max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(config).eval()


def test_embeddings_that_scale_their_output_scale_the_trained_rows_too(tmp_path):
    """Gemma's embedding multiplies its output by ``embed_scale``: the trained rows are scaled the same
    way (they were not: logits off by 7.8 against HF), unmerged and merged alike, both ways with HF."""
    peft = pytest.importorskip("peft")
    from peft_kernel_testing.hf_oracle import hf_oracle

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with hf_oracle("HF peft on a Gemma3 with trainable tokens"):
        hf = peft.get_peft_model(_tiny_gemma3(), peft.TrainableTokensConfig(token_indices=TOKENS, init_weights=False))
        hf.eval().save_pretrained(tmp_path / "hf")
        with torch.no_grad():
            expected = hf(input_ids=ids).logits
    ours = pk.PeftModel.from_pretrained(_tiny_gemma3(), tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        ours.merge_adapter()
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
