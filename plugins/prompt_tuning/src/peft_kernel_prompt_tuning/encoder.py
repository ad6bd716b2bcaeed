"""``PromptEmbedding``: the learned virtual-token embeddings of one prompt-tuning adapter."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_kernel_prompt_learning.learner import PromptEncoder
from peft_kernel_prompt_learning.text_init import embedded_tokens, text_token_ids
from peft_kernel_prompt_tuning.config import PromptTuningConfig, PromptTuningInit


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
            token_ids = text_token_ids(config.prompt_tuning_init_text, config.tokenizer_name_or_path,
                                       config.tokenizer_kwargs, total)
        else:  # SAMPLE_VOCAB
            token_ids = torch.randint(0, word_embeddings.weight.shape[0], (total,), dtype=torch.long)
        vectors = embedded_tokens(word_embeddings, token_ids)
        self.embedding.weight = nn.Parameter(vectors)

    def forward(self, *args: Any) -> torch.Tensor:
        return self.embedding.weight
