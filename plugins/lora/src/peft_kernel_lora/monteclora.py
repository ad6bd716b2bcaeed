"""MonteCLoRA (``LoraConfig.monteclora_config``): the adapter state and its inference.

Each adapter gets a ``MontecloraSampler`` (``lora_monteclora_sampler.<adapter>``, HF PEFT's keys):
the trainable ``std_prior`` [r] and ``expert_weights_prior`` [num_samples] (uniform in [0, 1) at
creation, as HF PEFT draws them), the buffers ``gaussian_var_prior`` [r, r] (identity) and
``expert_weights`` [num_samples] (uniform). In eval mode the adapter is plain LoRA (HF PEFT's
output, and what is merged); the training-time Monte Carlo sampling and the variational loss are
not implemented: a training-mode forward through a MonteCLoRA adapter raises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peft_kernel.plugin_api import UnsupportedFeatureError
from peft_kernel_lora.monteclora_config import monteclora_settings

if TYPE_CHECKING:
    from peft_kernel_lora.layers import LoraLayer


class MontecloraSampler(nn.Module):
    """One adapter's variational state on one layer (HF PEFT's tensors, names and shapes)."""

    def __init__(self, in_features: int, rank: int, num_samples: int, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.num_samples = in_features, rank, num_samples
        self.std_prior = nn.Parameter(torch.rand(rank, device=device, dtype=dtype))
        self.expert_weights_prior = nn.Parameter(torch.rand(num_samples, device=device, dtype=dtype))
        self.register_buffer("gaussian_var_prior", torch.eye(rank, device=device, dtype=dtype))
        self.register_buffer("expert_weights", torch.full((num_samples,), 1 / num_samples, device=device, dtype=dtype))


def add(layer: LoraLayer, adapter_name: str, monteclora_config: Any) -> None:
    """Give ``adapter_name`` its sampler (after LoRA's own initialisation, in HF PEFT's random order)."""
    from peft_kernel_lora.layers import Linear

    if not isinstance(layer, Linear):
        raise UnsupportedFeatureError(f"MonteCLoRA supports nn.Linear and Conv1D layers only, not "
                                      f"{type(layer.base_layer).__name__}")
    settings = monteclora_settings(monteclora_config)
    weight = layer.lora_A[adapter_name].weight
    layer.lora_monteclora_sampler[adapter_name] = MontecloraSampler(
        layer.in_features, layer.r[adapter_name], settings.num_samples, weight.device, weight.dtype)


def refuse_training(adapter_name: str) -> None:
    raise UnsupportedFeatureError(
        f"adapter {adapter_name!r} is a MonteCLoRA adapter: peft-kernel-lora implements its inference (eval mode: "
        "plain LoRA), loading, saving and merging, not its training-time Monte Carlo sampling and variational loss; "
        "call model.eval() or train with HF PEFT")


def training(layer: LoraLayer, adapter_name: str) -> bool:
    """A MonteCLoRA adapter of a layer in training mode (whose forward is not implemented)."""
    return layer.training and adapter_name in layer.lora_monteclora_sampler
