"""Encoder-decoder helpers for prompt-learning tests: tiny T5 and BART whose greedy outputs vary from
row to row, and the check that ``generate`` equals greedy decoding through the model's own forward."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_kernel_testing.generation import greedy_decode
from peft_kernel_testing.hf_oracle import max_abs_diff
from peft_kernel_testing.models import make_model

SEQ2SEQ_KINDS = ("t5", "bart")


def seq2seq_model(kind: str) -> nn.Module:
    """A tiny encoder-decoder (``"t5"`` or ``"bart"``) in eval mode, with weights larger than usual
    so that its greedy outputs vary from row to row."""
    if kind == "bart":
        import transformers as tf

        torch.manual_seed(0)
        return tf.BartForConditionalGeneration(tf.BartConfig(
            d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64, max_position_embeddings=64, pad_token_id=1,
            bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, init_std=0.2)).eval()
    if kind != "t5":
        raise KeyError(kind)
    model = make_model("t5")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model


class DecoderView(nn.Module):
    """The decoder of a seq2seq model as a causal LM over ``decoder_input_ids`` with the encoder's
    inputs fixed, so :func:`greedy_decode` decodes through the model's own forward."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        super().__init__()
        self.model, self.encoder_inputs = model, {"input_ids": input_ids, "attention_mask": attention_mask}
        self.generation_config = model.generation_config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
        return self.model(**self.encoder_inputs, decoder_input_ids=input_ids, **kwargs)


def check_seq2seq_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           max_new_tokens: int = 4, tolerance: float = 1e-4, **routing: Any) -> torch.Tensor:
    """``generate`` (greedy, with and without the cache) equals greedy decoding through the forward:
    same tokens, same logits at every step. Further keywords (``adapter_names``, ``task_ids``) go to
    both. Returns the tokens."""
    start = torch.full((input_ids.shape[0], 1), model.generation_config.decoder_start_token_id)
    expected, expected_logits = greedy_decode(DecoderView(model, input_ids, attention_mask), start, None,
                                              max_new_tokens, **routing)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, **routing)
        uncached = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                  do_sample=False, use_cache=False, **routing)
    assert max_abs_diff(torch.stack(out.logits), expected_logits) <= tolerance
    assert torch.equal(out.sequences, expected), f"generate {out.sequences.tolist()} != greedy {expected.tolist()}"
    assert torch.equal(uncached, expected), f"generate(use_cache=False) {uncached.tolist()} != greedy {expected.tolist()}"
    return expected
