"""KaSA (Knowledge-aware Singular-value Adaptation) on LoRA's linear layers.

Adding a KaSA adapter drops the ``r`` smallest singular components of the base weight (a one-time,
destructive SVD truncation, as in HF PEFT) and inserts a trainable diagonal ``lora_diag`` [r]
between ``A`` and ``B``: the layer adds ``scaling * B(diag(lora_diag) A x)``. For the stacked
mixed-batch kernels and merging the diagonal is folded into ``A`` (``lora_diag[:, None] * A``).
Because the truncation changes the base, KaSA and non-KaSA adapters are not mixed on one model (HF's rule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

if TYPE_CHECKING:
    from peft_kernel_lora.layers import LoraLayer


def add(layer: LoraLayer, adapter_name: str, r: int, module_name: str) -> None:
    """Truncate ``layer``'s base weight by its ``r`` smallest singular components and create ``lora_diag``."""
    from peft_kernel_lora.layers import Linear

    if not isinstance(layer, Linear) or layer.fan_in_fan_out:
        raise ValueError(f"KaSA (kasa_config) is only supported for nn.Linear layers, not {type(layer.base_layer).__name__} "
                         f"(module {module_name!r}).")
    smallest = min(layer.in_features, layer.out_features)
    if r >= smallest:
        raise ValueError(f"KaSA requires `r` ({r}) to be smaller than min(in_features, out_features) ({smallest}) so that "
                         f"at least one singular component of the base weight is preserved after truncation (module {module_name!r}).")
    weight = layer.base_layer.weight
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"KaSA needs a float base weight to truncate, got {weight.dtype} (module {module_name!r})")
    with torch.no_grad():
        left, singular, right_h = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
        keep = smallest - r
        truncated = (left[:, :keep] * singular[:keep]) @ right_h[:keep]
        weight.copy_(truncated.to(weight.dtype))
    layer.lora_diag[adapter_name] = nn.Parameter(torch.randn(r))
    layer.derived_factor_adapters.add(adapter_name)


def check_model(model: nn.Module, config: Any) -> None:
    """HF's rule: an adapter with KaSA and one without cannot share a model (KaSA rewrote the base)."""
    from peft_kernel_lora.layers import LoraLayer

    new_is_kasa = config.kasa_config is not None
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        if (new_is_kasa and len(module.lora_diag) == len(module.r)) or (not new_is_kasa and not module.lora_diag):
            continue  # one set lookup per layer, whatever the number of adapters
        for name in module.r:
            if (name in module.lora_diag) != new_is_kasa:
                raise ValueError(
                    "KaSA cannot be combined with adapters that don't use KaSA, since KaSA modifies the base weights: "
                    f"the new adapter {'uses' if new_is_kasa else 'does not use'} KaSA but adapter {name!r} "
                    f"{'does not' if new_is_kasa else 'does'}.")


def _eye_distance(gram: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


def loss(model: nn.Module, adapter_names: Iterable[str], settings: dict[str, dict]) -> torch.Tensor | float:
    """Sum over ``adapter_names``'s KaSA layers of ``beta * sum(lora_diag²) + gamma * (||BᵀB - I||_F +
    ||AAᵀ - I||_F)`` (``settings``: each adapter's ``kasa_config`` dict); ``0.0`` without any."""
    from peft_kernel_lora.layers import LoraLayer

    total: torch.Tensor | float = 0.0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in adapter_names:
            if name not in module.lora_diag or settings.get(name) is None:
                continue
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            beta, gamma = settings[name]["beta"], settings[name]["gamma"]
            total = total + beta * module.lora_diag[name].pow(2).sum() + gamma * (_eye_distance(b.T @ b) + _eye_distance(a @ a.T))
    return total
