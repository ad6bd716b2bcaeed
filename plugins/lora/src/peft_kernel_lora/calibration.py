"""What the data-driven initialisations (CorDA, LoRA-GA) share before the adapter exists: the
targeted linear layers of a bare model, their weights as [out, in], and the tensor cache files."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from peft_kernel.plugin_api import UnsupportedFeatureError, standard_match

if TYPE_CHECKING:
    from peft_kernel_lora.config import LoraConfig


def linear_weight(module: nn.Module, name: str = "", init: str = "") -> torch.Tensor:
    """A targeted layer's weight as [out, in]: ``nn.Linear``'s, transformers ``Conv1D``'s transposed;
    ``init`` names the initialisation in the error for other layer types."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.T
    if isinstance(module, nn.Linear):
        return module.weight
    raise UnsupportedFeatureError(f"init_lora_weights={init!r} supports nn.Linear and Conv1D layers only, "
                                  f"not {type(module).__name__} {name!r}")


def linear_targets(model: nn.Module, lora_config: LoraConfig, init: str, error: type[Exception],
                   caller: str) -> dict[str, nn.Module]:
    """``{name: module}`` of the layers ``lora_config`` targets in the bare ``model``; a targeted
    layer that is not linear is refused, no target at all raises ``error`` naming ``caller``."""
    targets = {}
    for name, module in model.named_modules():
        if name and standard_match(lora_config, name):
            linear_weight(module, name, init)
            targets[name] = module
    if not targets:
        raise error(f"{caller}: no module of the model matches the LoraConfig's targets")
    return targets


def load_tensors(path: Optional[str]) -> Optional[dict[str, torch.Tensor]]:
    """The tensors saved at ``path``, or ``None`` when there is no path or no file there yet."""
    return torch.load(path, map_location="cpu", weights_only=True) if path and os.path.exists(path) else None


def save_tensors(tensors: dict[str, torch.Tensor], path: Optional[str]) -> None:
    """Save ``tensors`` at ``path`` (creating its folder); nothing without a path."""
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save(tensors, path)
