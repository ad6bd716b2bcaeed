"""``PromptEmbedding``: the learned virtual-token embeddings of one prompt-tuning adapter."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from peft_kernel_prompt_learning.learner import PromptEncoder
from peft_kernel_prompt_tuning.config import PromptTuningConfig, PromptTuningInit


def _text_token_ids(config: PromptTuningConfig, total: int) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(
            f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenizes to no tokens; "
            "give a non-empty text."
        )
    # cut a long text, repeat a short one, so there is one token per virtual token
    return (ids * math.ceil(total / len(ids)))[:total]


class PromptEmbedding(PromptEncoder):
    """``[num_virtual_tokens * num_transformer_submodules, token_dim]`` embeddings (HF PEFT's
    ``PromptEmbedding``); ``embedding.weight`` is what gets trained and saved."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        init = config.prompt_tuning_init
        if config.inference_mode or init == PromptTuningInit.RANDOM:
            return  # weights come from a checkpoint, or stay normal-initialised
        if init == PromptTuningInit.TEXT:
            token_ids = torch.tensor(_text_token_ids(config, total), dtype=torch.long)
        else:  # SAMPLE_VOCAB
            vocab_size = word_embeddings.weight.shape[0]
            token_ids = torch.randint(0, vocab_size, (total,), dtype=torch.long)
        device = word_embeddings.weight.device
        with torch.no_grad():
            vectors = word_embeddings(token_ids.to(device)).detach().clone().to(torch.float32)
        self.embedding.weight = nn.Parameter(vectors)

    def forward(self, *args: Any) -> torch.Tensor:
        return self.embedding.weight
