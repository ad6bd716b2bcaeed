"""Prompt tuning, P-tuning and prefix tuning on encoder-decoder models (tiny T5 and BART,
``task_type="SEQ_2_SEQ_LM"``) against HF PEFT, the oracle.

What HF PEFT 0.21.2 does there (observed by running it under transformers 5.24), and what these
tests hold us to:

- prompt tuning / P-tuning learn ``2 * num_virtual_tokens`` tokens (``num_transformer_submodules=2``)
  but only the first half is used: prepended to the *encoder's* input embeddings, with ones in front of
  ``attention_mask``; decoder inputs, ``decoder_attention_mask`` and labels are left alone;
- prefix tuning gives a key/value prefix to the *decoder's* self-attention only (the encoder and the
  cross-attention get none), layer ``l`` reading blocks ``4l, 4l + 1`` (mod ``2 * num_layers``) of the
  saved prefix, and ``decoder_attention_mask`` gets ones in front;
- ``generate`` of prompt / P-tuning equals HF's; HF's ``generate`` of prefix tuning does not follow its
  own forward (already the first step differs), so ours is checked against greedy decoding through
  our forward (which equals HF's forward).

The method plugins are imported where installed; each test skips visibly without its plugin.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peft_kernel import PeftModel, get_peft_model
from peft_kernel_testing import max_abs_diff, perturb
from peft_kernel_testing.hf_oracle import hf_oracle
from peft_kernel_testing.seq2seq import check_seq2seq_generate as _check_generate
from peft_kernel_testing.seq2seq import seq2seq_model as _base

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")

TOL = 1e-5
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [3, 4, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26], [7, 7, 7, 8, 9, 9]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
DECODER_IDS = torch.tensor([[3, 17, 40, 12], [3, 9, 8, 33], [3, 50, 51, 52], [3, 5, 5, 6]])
DECODER_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
LABELS = torch.tensor([[17, 40, 12, 1], [9, 8, 33, -100], [50, 51, -100, -100], [5, 5, 6, 1]])

METHODS = {  # config class name: (plugin module, extra config fields)
    "PromptTuningConfig": ("peft_kernel_prompt_tuning", {}),
    "PromptEncoderConfig": ("peft_kernel_p_tuning", {"encoder_hidden_size": 8}),
    "PrefixTuningConfig": ("peft_kernel_prefix_tuning", {}),
}
CASES = [(method, kind) for method in METHODS for kind in ("t5", "bart")]


def _config(method: str, hf: bool = False, **kw: Any) -> Any:
    module, extra = METHODS[method]
    owner = peft if hf else pytest.importorskip(module, reason=f"{module} is not installed")
    return getattr(owner, method)(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, **extra, **kw)


def _ours(method: str, kind: str, seed: int = 0) -> PeftModel:
    model = get_peft_model(_base(kind), _config(method))
    perturb(model.prompt_encoder, seed, scale=1.0)
    return model.eval()


CALLS: list[dict[str, torch.Tensor]] = [
    {"input_ids": IDS, "attention_mask": MASK, "decoder_input_ids": DECODER_IDS, "labels": LABELS},
    {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS},  # decoder inputs from the labels
    {"input_ids": IDS, "attention_mask": MASK, "decoder_input_ids": DECODER_IDS, "decoder_attention_mask": DECODER_MASK},
    {"input_ids": IDS, "decoder_input_ids": DECODER_IDS},
]


def _outputs(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    with torch.no_grad():
        outs = [model(**call) for call in CALLS]
    return [(out.logits, getattr(out, "loss", None)) for out in outs]


def _assert_same(got: list, expected: list) -> None:
    for i, ((logits, loss), (want_logits, want_loss)) in enumerate(zip(got, expected)):
        assert max_abs_diff(logits, want_logits) <= TOL, CALLS[i].keys()
        assert (loss is None) == (want_loss is None)
        if loss is not None:
            assert abs(loss.item() - want_loss.item()) <= TOL, CALLS[i].keys()


@pytest.mark.parametrize("method, kind", CASES)
def test_hf_checkpoint_loads_with_equal_logits_loss_and_generate(method, kind, tmp_path):
    with hf_oracle(f"HF peft saving a seq2seq {method} adapter"):
        hf = peft.get_peft_model(_base(kind), _config(method, hf=True)).eval()
        perturb(hf.prompt_encoder, 1, scale=1.0)
        hf.save_pretrained(tmp_path)
        expected = _outputs(hf)
        embeds = {"inputs_embeds": hf.word_embeddings(IDS), "attention_mask": MASK,
                  "decoder_inputs_embeds": hf.word_embeddings(DECODER_IDS)}
        with torch.no_grad():
            hf_generated = hf.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False)
            hf_embeds_logits = hf(**embeds).logits
    ours = PeftModel.from_pretrained(_base(kind), tmp_path)
    assert type(ours).__name__ == type(hf).__name__ == "PeftModelForSeq2SeqLM"
    assert ours.peft_config["default"].num_transformer_submodules == 2
    _assert_same(_outputs(ours), expected)
    with torch.no_grad():
        assert max_abs_diff(ours(**embeds).logits, hf_embeds_logits) <= TOL
    tokens = _check_generate(ours, IDS, MASK)
    assert len({tuple(row) for row in tokens.tolist()}) > 1  # the check is not vacuous
    if method != "PrefixTuningConfig":  # HF's prefix-tuning generate does not follow its forward
        assert torch.equal(tokens, hf_generated)


@pytest.mark.parametrize("method, kind", CASES)
def test_our_checkpoint_loads_in_hf_with_equal_outputs(method, kind, tmp_path):
    ours = _ours(method, kind, seed=2)
    ours.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    with hf_oracle(f"HF peft loading our seq2seq {method} adapter"):
        theirs = peft.PeftModel.from_pretrained(_base(kind), tmp_path).eval()
        got = _outputs(theirs)
        reference = peft.get_peft_model(_base(kind), _config(method, hf=True))
        shape = tuple(reference.get_prompt_embedding_to_save("default").shape)
    assert list(saved) == ["prompt_embeddings"] and tuple(saved["prompt_embeddings"].shape) == shape
    _assert_same(got, _outputs(ours))


@pytest.mark.parametrize("method", list(METHODS))
def test_mixed_batch_rows_and_generate_equal_single_adapter_runs(method):
    model = _ours(method, "t5")
    model.add_adapter("other", _config(method))
    perturb(model.prompt_encoder["other"], 7, scale=1.0)
    model.eval()
    names = ["default", "other", "other", "default"]
    for call in CALLS:
        with torch.no_grad():
            mixed = model(**call, adapter_names=names).logits
        for row, name in enumerate(names):
            model.set_adapter(name)
            with torch.no_grad():
                single = model(**{k: v[row: row + 1] for k, v in call.items()}).logits
            assert max_abs_diff(mixed[row: row + 1], single) <= TOL, (row, name)
    assert max_abs_diff(mixed[0], mixed[1]) > 1e-3
    _check_generate(model, IDS, MASK, adapter_names=names)
    with torch.no_grad():  # beam search expands every row: each beam keeps its row's adapter
        beams = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, num_beams=3, adapter_names=names)
        for row, name in enumerate(names):
            model.set_adapter(name)
            single = model.generate(input_ids=IDS[row: row + 1], attention_mask=MASK[row: row + 1], max_new_tokens=4,
                                    num_beams=3)
            assert torch.equal(beams[row: row + 1, : single.shape[1]], single), (row, name)


@pytest.mark.parametrize("method", list(METHODS))
def test_training_changes_only_the_prompt_parameters(method):
    model = _ours(method, "t5").train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("prompt_encoder.") for name in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=IDS, attention_mask=MASK, labels=LABELS).loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in trainable), name


def test_generate_takes_decoder_input_ids_and_refuses_positional_inputs_as_hf(tmp_path):
    pytest.importorskip("peft_kernel_prompt_tuning")
    with hf_oracle("HF peft generating from decoder_input_ids"):
        hf = peft.get_peft_model(_base("t5"), _config("PromptTuningConfig", hf=True)).eval()
        perturb(hf.prompt_encoder, 3, scale=1.0)
        hf.save_pretrained(tmp_path)
        start = DECODER_IDS[:, :2]
        with torch.no_grad():
            expected = hf.generate(input_ids=IDS, attention_mask=MASK, decoder_input_ids=start, max_new_tokens=3)
        with pytest.raises(TypeError):
            hf.generate(IDS)
    ours = PeftModel.from_pretrained(_base("t5"), tmp_path)
    with torch.no_grad():
        assert torch.equal(ours.generate(input_ids=IDS, attention_mask=MASK, decoder_input_ids=start, max_new_tokens=3),
                           expected)
    with pytest.raises(TypeError):
        ours.generate(IDS)


def test_prefix_goes_to_the_decoder_self_attention_in_hfs_layout():
    """The cache ``get_prompt`` returns is HF's: an ``EncoderDecoderCache`` whose self-attention part holds
    the prefix (layer ``l``: blocks ``4l, 4l + 1`` mod ``2 * num_layers``) and whose cross-attention part
    is empty."""
    pytest.importorskip("peft_kernel_prefix_tuning")
    import transformers as tf

    def four_layer_t5() -> nn.Module:
        torch.manual_seed(0)
        return tf.T5ForConditionalGeneration(tf.T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=4, num_heads=2,
                                                         vocab_size=64, pad_token_id=0, decoder_start_token_id=0)).eval()

    ours = get_peft_model(four_layer_t5(), _config("PrefixTuningConfig"))
    perturb(ours.prompt_encoder, 4, scale=1.0)
    with hf_oracle("HF peft building a seq2seq prefix"):
        hf = peft.get_peft_model(four_layer_t5(), _config("PrefixTuningConfig", hf=True))
        hf.prompt_encoder["default"].load_state_dict(ours.prompt_encoder["default"].state_dict())
        theirs = hf.get_prompt(2)
    mine = ours.get_prompt(2)
    assert type(mine).__name__ == type(theirs).__name__ == "EncoderDecoderCache"
    assert mine.cross_attention_cache.get_seq_length() == theirs.cross_attention_cache.get_seq_length() == 0
    blocks = ours.prompt_encoder["default"]().reshape(3, 8, 2, 8).permute(1, 2, 0, 3)  # [block, head, token, dim]
    for layer, (a, b) in enumerate(zip(mine.self_attention_cache.layers, theirs.self_attention_cache.layers)):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), layer
        assert torch.equal(a.keys[0], blocks[(4 * layer) % 8]) and torch.equal(a.values[1], blocks[(4 * layer + 1) % 8])


@pytest.mark.parametrize("model_fields, fields, message", [
    ({"num_decoder_layers": 3}, {}, "decoder has 3 layers"),
    ({}, {"num_transformer_submodules": 1}, "num_transformer_submodules must be 2"),
])
def test_prefixes_that_cannot_fit_the_decoder_are_refused_when_created(model_fields, fields, message):
    """HF PEFT fails in the forward (IndexError) for a deeper decoder, and with one submodule gives a
    cache that transformers 5 also fills with cross-attention keys (HF's logits then differ from a
    decoder-self-attention prefix by ~3): both refused up front, naming the field."""
    pytest.importorskip("peft_kernel_prefix_tuning")
    import transformers as tf

    from peft_kernel.errors import ConfigError

    model = tf.T5ForConditionalGeneration(tf.T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2,
                                                      vocab_size=64, decoder_start_token_id=0, **model_fields))
    with pytest.raises(ConfigError, match=message):
        get_peft_model(model, _config("PrefixTuningConfig", **fields))


def test_one_submodule_prompt_tuning_cross_loads_as_hf(tmp_path):
    """``num_transformer_submodules=1`` (not the default on seq2seq): HF learns ``num_virtual_tokens``
    tokens only and prepends them to the encoder, as with two."""
    with hf_oracle("HF peft saving one-submodule seq2seq prompt tuning"):
        hf = peft.get_peft_model(_base("t5"), _config("PromptTuningConfig", hf=True, num_transformer_submodules=1))
        perturb(hf.prompt_encoder, 5, scale=1.0)
        hf.eval().save_pretrained(tmp_path)
        expected = _outputs(hf)
    ours = PeftModel.from_pretrained(_base("t5"), tmp_path)
    assert tuple(ours.get_prompt_embedding_to_save("default").shape) == (3, 16)
    _assert_same(_outputs(ours), expected)
