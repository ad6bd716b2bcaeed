"""VeLoRA (``LoraConfig.velora_config``): LoRA whose ``lora_A`` input is kept compressed for the backward pass.

The input ``x`` of ``lora_A`` ([tokens, in], zero-padded to ``num_groups·g`` features, ``g =
ceil(in / num_groups)``) is cut into ``num_groups`` groups of ``g`` features; each group is kept as
its projection on the unit vector ``v`` ([g], the buffer ``lora_velora_embed``, saved with the
adapter), one number per token and group. The backward reconstructs ``x̂ = scale·(x·v)·v`` per
group, so ``lora_A``'s gradient is ``scale·dzᵀ·x̂`` instead of ``dzᵀ·x``; the gradient of ``x`` and
``lora_B``'s are exact, and the forward is LoRA's (merge, mixed batches and eval are LoRA's).

``v`` is the normalised mean of the groups over all tokens of the current training input
(``batch_average``: every training forward; ``batch_average_once``: the first training forward
after the adapter was created or loaded), or a random unit vector drawn at creation (``random``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import attrs
import torch
import torch.nn.functional as F

from peft_kernel.plugin_api import UnsupportedFeatureError
from peft_kernel_lora.velora_config import VeloraConfig, velora_settings

if TYPE_CHECKING:
    from peft_kernel_lora.layers import LoraLayer


@attrs.define
class VeloraState:
    """One adapter's VeLoRA settings on one layer; ``initialized``: ``v`` was set from data (not saved)."""

    settings: VeloraConfig
    initialized: bool = False


def add(layer: LoraLayer, adapter_name: str, velora_config: Any) -> None:
    """Give ``adapter_name`` its VeLoRA state and projection buffer (zeros, or a random unit vector)."""
    from peft_kernel_lora.layers import Linear

    if not isinstance(layer, Linear):
        raise UnsupportedFeatureError(f"VeLoRA supports nn.Linear and Conv1D layers only, not "
                                      f"{type(layer.base_layer).__name__}")
    settings = velora_settings(velora_config)
    group = math.ceil(layer.in_features / settings.num_groups)
    weight = layer.lora_A[adapter_name].weight
    if settings.init_type == "random":
        v = torch.randn(group, device=weight.device, dtype=weight.dtype)
        v = v / v.norm()
    else:
        v = torch.zeros(group, device=weight.device, dtype=weight.dtype)
    layer.lora_velora_embed[adapter_name] = v
    layer.lora_velora[adapter_name] = VeloraState(settings)


def _groups(x: torch.Tensor, num_groups: int, group: int) -> torch.Tensor:
    """``x`` [..., in] as [tokens, num_groups, group], zero-padded."""
    rows = x.reshape(-1, x.shape[-1])
    rows = F.pad(rows, (0, num_groups * group - rows.shape[-1]))
    return rows.reshape(rows.shape[0], num_groups, group)


@torch.no_grad()
def _update(layer: LoraLayer, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
    """The projection vector for this training forward (recomputed from ``x`` as ``init_type`` asks)."""
    state, v = layer.lora_velora[adapter_name], layer.lora_velora_embed[adapter_name]
    kind = state.settings.init_type
    if kind == "batch_average" or (kind == "batch_average_once" and not state.initialized):
        mean = _groups(x.detach(), state.settings.num_groups, v.shape[0]).mean(dim=(0, 1))
        v.copy_(F.normalize(mean, dim=0).to(v.dtype))
        state.initialized = True
    return v


class _CompressedLinear(torch.autograd.Function):
    """``x @ Aᵀ`` keeping only ``x``'s per-group projections on ``v`` for the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, v: torch.Tensor, num_groups: int,
                scale: float) -> torch.Tensor:
        ctx.save_for_backward(_groups(x, num_groups, v.shape[0]) @ v, weight, v)
        ctx.scale, ctx.in_features = scale, x.shape[-1]
        return x @ weight.T

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        compressed, weight, v = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            rebuilt = (compressed[..., None] * v).reshape(compressed.shape[0], -1)[:, : ctx.in_features]
            grad_weight = ctx.scale * grad.reshape(-1, grad.shape[-1]).T @ rebuilt
        return grad_x, grad_weight, None, None, None


def product(layer: LoraLayer, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
    """``scaling·B(A(x))`` with VeLoRA's compressed backward (``x`` already dropped out)."""
    v = _update(layer, adapter_name, x)
    settings = layer.lora_velora[adapter_name].settings
    lora_a = layer.lora_A[adapter_name].weight
    hidden = _CompressedLinear.apply(x, lora_a, v.to(x.dtype), settings.num_groups, settings.scale)
    return layer.lora_B[adapter_name](hidden) * layer.scaling[adapter_name]


def active(layer: LoraLayer, adapter_name: str) -> bool:
    """VeLoRA changes this forward: a VeLoRA adapter of a layer in training mode with autograd on."""
    return adapter_name in layer.lora_velora and layer.training and torch.is_grad_enabled()
