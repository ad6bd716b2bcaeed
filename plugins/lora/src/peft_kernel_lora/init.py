"""LoRA initialisations: ``init_lora_weights`` = True, False, "gaussian", "pissa", "pissa_niter_<n>", "olora",
"loftq" (in :mod:`peft_kernel_lora.loftq`), "corda" (in :mod:`peft_kernel_lora.corda`), "lora_ga" (in
:mod:`peft_kernel_lora.lora_ga`), "eva" (as True here; :mod:`peft_kernel_lora.eva` then sets A from data),
"orthogonal" (in :mod:`peft_kernel_lora.orthogonal_init`).

True/"gaussian" make B (or, for embeddings, A) zero so the adapter starts as the identity.
PiSSA and OLoRA start from a decomposition of the base weight and subtract the part the adapter
now carries from the base weight, so the model output is unchanged at initialisation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from peft_kernel_lora.layers import LoraLayer


def initialize(layer: LoraLayer, adapter_name: str, how: Union[bool, str], loftq_config: Any = None,
               lora_ga_config: Any = None) -> None:
    if how is False:
        return
    if how == "lora_ga":
        from peft_kernel_lora import lora_ga

        lora_ga.initialize(layer, adapter_name, lora_ga_config)
        return
    if how == "loftq":
        from peft_kernel_lora import loftq

        loftq.initialize(layer, adapter_name, loftq_config)
        return
    if how == "corda":
        from peft_kernel_lora import corda

        corda.initialize(layer, adapter_name)
        return
    if how == "orthogonal":
        from peft_kernel_lora import orthogonal_init

        orthogonal_init.initialize(layer, adapter_name)
        return
    with torch.no_grad():
        if adapter_name in layer.lora_embedding_A:
            nn.init.zeros_(layer.lora_embedding_A[adapter_name])
            nn.init.normal_(layer.lora_embedding_B[adapter_name])
            return
        a, b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        if b.bias is not None:
            nn.init.zeros_(b.bias)
        if how is True or how == "eva":  # EVA: overwritten by initialize_lora_eva_weights
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        elif how == "gaussian":
            nn.init.normal_(a.weight, std=1 / layer.r[adapter_name])
            nn.init.zeros_(b.weight)
        elif how == "olora":
            _olora(layer, adapter_name)
        elif how == "pissa" or how.startswith("pissa_niter_"):
            _pissa(layer, adapter_name, None if how == "pissa" else int(how.rsplit("_", 1)[-1]))
        else:
            raise ValueError(f"unknown init_lora_weights {how!r}")


def _float_base(layer: LoraLayer) -> torch.Tensor:
    if not hasattr(layer, "in_features"):
        raise ValueError(f"PiSSA/OLoRA initialisation is only implemented for linear layers, not {type(layer.base_layer).__name__}")
    weight = layer.base_weight()
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"PiSSA/OLoRA need a float base weight, got {weight.dtype}; dequantize the model first")
    return weight.to(torch.float32)


def write_factors(layer: LoraLayer, adapter_name: str, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> None:
    """Set A, B and the residual base weight ``W - s·BA`` (in the base's layout and dtype)."""
    lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    lora_a.copy_(a.to(lora_a.dtype))
    lora_b.copy_(b.to(lora_b.dtype))
    residual = weight - layer.scaling[adapter_name] * (b @ a)
    base = layer.base_layer.weight
    base.copy_(layer.to_base_layout(residual).to(base.dtype))


def _pissa(layer: LoraLayer, adapter_name: str, niter: int | None) -> None:
    weight = _float_base(layer)
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    if niter is None:
        left, singular, right_h = torch.linalg.svd(weight, full_matrices=False)
        left, singular, right_h = left[:, :r], singular[:r], right_h[:r]
    else:
        left, singular, right = torch.svd_lowrank(weight, r, niter=niter)
        right_h = right.T
    root = torch.sqrt(singular / scaling)
    write_factors(layer, adapter_name, root[:, None] * right_h, left * root[None, :], weight)


def _olora(layer: LoraLayer, adapter_name: str) -> None:
    weight = _float_base(layer)
    r = layer.r[adapter_name]
    q, upper = torch.linalg.qr(weight)
    write_factors(layer, adapter_name, upper[:r].contiguous(), q[:, :r].contiguous(), weight)
