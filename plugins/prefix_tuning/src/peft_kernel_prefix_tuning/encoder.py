"""``PrefixEncoder``: the key/value prefix of one prefix-tuning adapter."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_kernel.plugin_api import CheckpointError
from peft_kernel_prompt_learning.learner import PromptEncoder
from peft_kernel_prefix_tuning.config import PrefixTuningConfig


class PrefixEncoder(PromptEncoder):
    """``[num_virtual_tokens, num_layers * 2 * token_dim]``: per virtual token, a key and a value for
    every layer (HF PEFT's ``PrefixEncoder``).

    With ``prefix_projection`` (and not in inference mode) a ``token_dim`` embedding goes through
    ``transform`` (Linear, Tanh, Linear); otherwise ``embedding`` holds the prefix directly, which is
    also how a saved adapter comes back.
    """

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        n, width = config.num_virtual_tokens, config.num_layers * 2 * config.token_dim
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        if self.prefix_projection:
            self.embedding = nn.Embedding(n, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)
        self.width = width

    def forward(self, *args: Any) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def load_saved_prompt(self, tensor: torch.Tensor) -> None:
        if self.prefix_projection:
            raise CheckpointError(
                "a prefix_projection adapter is saved as its projected prefix, without the MLP, so it cannot be "
                "loaded back into a trainable MLP encoder; load it with is_trainable=False (inference_mode=True)."
            )
        super().load_saved_prompt(tensor)
