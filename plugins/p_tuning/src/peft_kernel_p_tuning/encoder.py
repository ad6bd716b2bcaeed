"""``PromptEncoder``: P-tuning's virtual tokens, an embedding reparameterised by an MLP or an LSTM.

Module and parameter names are HF PEFT's (``embedding``, ``mlp_head``, ``lstm_head``), so
``prompt_encoder.*`` tensors saved with ``save_encoder=True`` name the same weights HF trains.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_kernel.plugin_api import CheckpointError
from peft_kernel_p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from peft_kernel_prompt_learning.learner import PromptEncoder as _VirtualTokens


class PromptEncoder(_VirtualTokens):
    """``[num_virtual_tokens * num_transformer_submodules, token_dim]`` virtual tokens.

    Trainable (not ``inference_mode``): ``mlp_head(embedding)`` or
    ``mlp_head(lstm_head(embedding))``. In inference mode (a loaded checkpoint) ``embedding`` holds
    the tokens themselves, as HF PEFT does.
    """

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        total, dim, hidden = config.num_virtual_tokens * config.num_transformer_submodules, config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(total, dim)
        self.save_encoder = config.save_encoder
        self.reparameterized = not config.inference_mode
        if not self.reparameterized:
            return
        if config.encoder_reparameterization_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self, *args: Any) -> torch.Tensor:
        tokens = self.embedding.weight
        if not self.reparameterized:
            return tokens
        if hasattr(self, "lstm_head"):
            tokens = self.lstm_head(tokens.unsqueeze(0))[0].squeeze(0)
        return self.mlp_head(tokens)

    def saved_extras(self) -> dict[str, torch.Tensor]:
        """With ``save_encoder``: every weight of the trainable encoder (to resume training)."""
        if not (self.save_encoder and self.reparameterized):
            return {}
        return {name: tensor.detach() for name, tensor in self.state_dict().items()}

    def load_checkpoint(self, prompt: torch.Tensor, extras: dict[str, torch.Tensor]) -> None:
        if not self.reparameterized:  # inference: the saved output is the embedding; encoder weights unused
            self.load_saved_prompt(prompt)
            return
        if not extras:
            raise CheckpointError(
                "this P-tuning checkpoint holds the encoder's output only (HF PEFT's format), not its MLP/LSTM "
                "weights, so training cannot resume from it: load it with is_trainable=False, or save with "
                "PromptEncoderConfig(save_encoder=True) to resume training."
            )
        own = self.state_dict()
        problems = sorted(set(own) ^ set(extras)) + [
            f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in extras.items() if k in own and v.shape != own[k].shape
        ]
        if problems:
            raise CheckpointError(f"the checkpoint's prompt_encoder.* tensors do not fit this encoder: {problems[:8]}")
        self.load_state_dict({k: v.to(device=own[k].device, dtype=own[k].dtype) for k, v in extras.items()})
