"""``hotswap_adapter``: replace an adapter's weights in place, keeping modules (and compiled graphs).

The new adapter must be of the same method and shapes (rank) and target the same modules. Values
that are not tensors (LoRA's ``scaling``) are refreshed through the layer's ``hotswap_update``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from peft_kernel.checkpoint import load_adapter_weights
from peft_kernel.config import PeftConfig
from peft_kernel.errors import CheckpointError
from peft_kernel.layer import adapter_layers
from peft_kernel.plugins import get_registry
from peft_kernel.state_dict import adapter_tensors


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | os.PathLike,
    adapter_name: str,
    torch_device: str | None = None,
    **kwargs: Any,
) -> None:
    """Swap the weights of loaded adapter ``adapter_name`` for those saved at ``model_name_or_path``."""
    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder") if k in kwargs}
    config = PeftConfig.from_pretrained(model_name_or_path, **hub)
    if adapter_name not in model.peft_config:
        raise CheckpointError(f"hotswap needs a loaded adapter named {adapter_name!r}; loaded: {sorted(model.peft_config)}")
    old = model.peft_config[adapter_name]
    registry = get_registry()
    record = registry.method_for_config(config)
    if registry.method_for_config(old).peft_type != record.peft_type:
        raise CheckpointError(f"cannot hotswap a {old.peft_type} adapter for a {config.peft_type} one.")
    if not record.supports("hotswap"):
        raise CheckpointError(f"{record.peft_type} adapters do not support hotswapping.")
    weights = load_adapter_weights(model_name_or_path, subfolder=hub.get("subfolder"), device=torch_device or "cpu",
                                   **{k: v for k, v in hub.items() if k != "subfolder"})
    weights = registry.map_state_dict(config, weights, "load")
    targets = adapter_tensors(model, adapter_name)
    unexpected = sorted(set(weights) - set(targets))
    missing = sorted(set(targets) - set(weights))
    if unexpected or missing:
        raise CheckpointError(
            f"hotswap needs the same target modules: keys only in the new adapter {unexpected[:5]}, "
            f"only in the loaded one {missing[:5]}."
        )
    bad = [f"{k}: {tuple(weights[k].shape)} vs {tuple(t.shape)}" for k, t in targets.items() if weights[k].shape != t.shape]
    if bad:
        raise CheckpointError(f"hotswap needs equal shapes (same rank); differing: {bad[:5]}")
    with torch.no_grad():
        for key, tensor in targets.items():
            tensor.copy_(weights[key].to(device=tensor.device, dtype=tensor.dtype))
    for name, layer in adapter_layers(model):
        if layer.has_adapter(adapter_name):
            layer.hotswap_update(adapter_name, config, name)
    config.inference_mode = old.inference_mode
    model.peft_config[adapter_name] = config
