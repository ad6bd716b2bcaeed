"""DoRA: weight-decomposed LoRA. The adapted weight ``W + s·BA`` is normalised per output channel
and rescaled by a learned magnitude ``m``; the norm is treated as a constant in the backward pass
(DoRA paper, section 4.3), as HF PEFT does.

In additive form, for input ``x`` (after dropout): ``delta = (f - 1)·W x + f·s·B A x`` with
``f = m / ||W + s·BA||``, which is what makes DoRA work in mixed batches like plain LoRA.

Several adapters active at once (HF PEFT's rules, observed numerically): the norm is always taken
on the *bare* base weight ``W`` (never on a weight holding other adapters), but ``f`` rescales
everything the layer outputs so far without its bias — the base and the adapters applied before
this one — unless dropout is live in training (then ``W·dropout(x)`` alone). Merging follows the
same rule: ``W' = f·(W_current + s·BA)`` with ``f`` from the bare ``W``, so merged == unmerged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from peft_kernel_lowrank.adapter_cache import AdapterCache

if TYPE_CHECKING:
    from peft_kernel_lora.layers import LoraLayer


def _is_conv(layer: LoraLayer) -> bool:
    return getattr(layer, "ndim", 0) > 0


def weight_norm(layer: LoraLayer, adapter_name: str, base: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel L2 norm of ``W + s·BA`` (shape [out]); ``W`` is ``base`` ([out, in, ...])
    if given, else the base layer's weight as it is now."""
    lora = layer.lora_weight(adapter_name)
    base = layer.base_weight() if base is None else base
    weight = base.to(lora.dtype) + layer.scaling[adapter_name] * lora
    return weight.norm(p=2, dim=tuple(range(1, weight.dim())))


def initial_magnitude(layer: LoraLayer, adapter_name: str) -> torch.Tensor:
    """``m`` starts as the norm, so the adapter starts as plain LoRA (shape as HF PEFT stores it)."""
    with torch.no_grad():
        norm = weight_norm(layer, adapter_name)
    if _is_conv(layer):
        return norm.view(1, -1, *([1] * layer.ndim)).clone()
    return norm.clone()


def current_norm(layer: LoraLayer, adapter_name: str) -> torch.Tensor:
    """:func:`weight_norm` on the base weight as it is now, detached; computed once and reused
    across forwards while the adapter's tensors, its scaling and the base weight are unchanged
    (an in-place write, a new tensor, a move or a merge into the base recomputes it)."""
    cache = layer.__dict__.setdefault("_dora_norms", AdapterCache())
    return cache.get(layer, adapter_name, lambda: weight_norm(layer, adapter_name).detach(),
                     extra=(layer.base_layer.weight,))


def forget(layer: LoraLayer, adapter_name: str) -> None:
    """Drop ``adapter_name``'s cached norm (the adapter was deleted)."""
    cache = layer.__dict__.get("_dora_norms")
    if cache is not None:
        cache.drop(adapter_name)


def factor(layer: LoraLayer, adapter_name: str, base: torch.Tensor | None = None) -> torch.Tensor:
    """``m / ||W + s·BA||`` per output channel (shape [out]), norm detached (``base`` as in
    :func:`weight_norm`; the base weight as it is now by default, its norm cached)."""
    norm = current_norm(layer, adapter_name) if base is None else weight_norm(layer, adapter_name, base).detach()
    return layer.lora_magnitude_vector[adapter_name].flatten() / norm


def delta(layer: LoraLayer, x: torch.Tensor, adapter_name: str, rescaled: torch.Tensor | None = None) -> torch.Tensor:
    """What the adapter adds: ``(f - 1)·rescaled + f·s·BA x``. ``rescaled`` is the output so far
    without the base bias (several active adapters, see the module docstring); by default ``W x``."""
    f = factor(layer, adapter_name)
    if _is_conv(layer):
        f = f.view(1, -1, *([1] * layer.ndim))
    lora = layer.lora_product(x, adapter_name)
    if rescaled is None:
        rescaled = layer.base_output_no_bias(x)
    return (f - 1) * rescaled.to(lora.dtype) + f * lora


def _per_channel(layer: LoraLayer, f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, *([1] * (layer.base_weight().dim() - 1)))


def merged_weight(layer: LoraLayer, adapter_name: str, merge_factor: torch.Tensor | None = None) -> torch.Tensor:
    """The base weight (as it is now, other adapters possibly merged) with DoRA folded in, in the
    base layer's own layout; ``merge_factor`` defaults to :func:`factor` on the bare base weight."""
    if merge_factor is None:
        merge_factor = factor(layer, adapter_name, layer.unmerged_base_weight())
    lora = layer.lora_weight(adapter_name)
    combined = layer.base_weight().to(lora.dtype) + layer.scaling[adapter_name] * lora
    return layer.to_base_layout(_per_channel(layer, merge_factor) * combined)


def unmerge(layer: LoraLayer, adapter_name: str, merged_factor: torch.Tensor) -> None:
    """Undo :func:`merged_weight` with the factor recorded at merge time."""
    lora = layer.lora_weight(adapter_name)
    merged = layer.base_weight().to(lora.dtype)
    original = merged / _per_channel(layer, merged_factor) - layer.scaling[adapter_name] * lora
    target = layer.base_layer.weight
    target.copy_(layer.to_base_layout(original).to(target.dtype))
