"""The Trainable Tokens method's layer: the shared token-rows layer (``peft_kernel_tokens``) built
from a ``TrainableTokensConfig``; tied embeddings get one row parameter (``tied_rows``)."""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel_tokens.layers import TrainableTokensLayer as _TokenRowsLayer
from peft_kernel_tokens.layers import check_indices, rows_key
from peft_kernel_trainable_tokens.config import TrainableTokensConfig


def _tied_key(weight: torch.Tensor) -> str:
    return f"tied:{id(weight)}"


def _initial_rows(config: TrainableTokensConfig, weight: torch.Tensor) -> torch.Tensor:
    if config.init_weights:  # the rows' own values: the adapter starts as the identity
        return weight.detach()[config.token_indices].clone()
    return torch.randn(len(config.token_indices), weight.shape[1], device=weight.device, dtype=weight.dtype)


def tied_rows(config: TrainableTokensConfig, bases: list[nn.Module]) -> dict[str, nn.Parameter] | None:
    """For each weight that several targeted modules share (tied embeddings), one row parameter."""
    seen: dict[int, int] = {}
    for base in bases:
        weight = getattr(base, "weight", None)
        if weight is not None:
            seen[id(weight)] = seen.get(id(weight), 0) + 1
    shared = {}
    for base in bases:
        weight = getattr(base, "weight", None)
        if weight is not None and seen[id(weight)] > 1 and _tied_key(weight) not in shared:
            shared[_tied_key(weight)] = nn.Parameter(_initial_rows(config, weight))
    return shared or None


class TrainableTokensLayer(_TokenRowsLayer):
    """Token rows from a ``TrainableTokensConfig`` (HF PEFT's ``TrainableTokensLayer``)."""

    def update_layer(self, adapter_name: str, config: TrainableTokensConfig, module_name: str = "",
                     shared: dict[str, torch.Tensor] | None = None) -> None:
        if shared and rows_key(module_name) in shared:  # rows built by another method (LoRA)
            super().update_layer(adapter_name, config, module_name, shared)
            return
        weight = self.base_layer.weight
        check_indices(config.token_indices, weight, module_name)
        tied = (shared or {}).get(_tied_key(weight))
        self.add_rows(adapter_name, tied if tied is not None else nn.Parameter(_initial_rows(config, weight)),
                      config.token_indices)


def make_layer(config: TrainableTokensConfig, adapter_name: str, base_layer: nn.Module, module_name: str,
               shared: dict[str, torch.Tensor] | None = None) -> TrainableTokensLayer | None:
    """Embeddings, and linear output embeddings (a tied ``lm_head``); ``None`` for other types."""
    if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
        return None
    layer = TrainableTokensLayer(base_layer)
    layer.update_layer(adapter_name, config, module_name, shared=shared)
    return layer
