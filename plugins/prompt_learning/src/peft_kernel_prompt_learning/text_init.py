"""Virtual tokens that start as the embeddings of a text (prompt tuning's ``TEXT`` init and the
methods that share it)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def text_token_ids(text: str, tokenizer_name_or_path: str, tokenizer_kwargs: Optional[dict], total: int) -> list[int]:
    """``total`` token ids of ``text`` (tokenized with ``tokenizer_name_or_path``), a long text cut and
    a short one repeated so there is one token per virtual token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path, **(tokenizer_kwargs or {}))
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {text!r} tokenizes to no tokens; give a non-empty text.")
    return (ids * math.ceil(total / len(ids)))[:total]


def embedded_tokens(word_embeddings: nn.Module, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """A float32 copy of the embeddings of ``token_ids`` (a new leaf, outside autograd)."""
    index = torch.as_tensor(token_ids, dtype=torch.long, device=word_embeddings.weight.device)
    with torch.no_grad():
        return word_embeddings(index).detach().clone().to(torch.float32)
