"""LoftQ initialisation (``init_lora_weights="loftq"``): quantise the base weight, start LoRA from
the SVD of what the quantisation lost.

For ``loftq_iter`` rounds: ``Q = quant(W - B·A)`` (``B·A = 0`` at first), then ``B, A`` = the rank-r
SVD factors of ``W - Q`` (``B = U·√S``, ``A = √S·Vᵀ``). The base layer keeps the dequantised ``Q``.
As HF PEFT, ``B·A`` approximates ``W - Q`` *unscaled*: the model at initialisation computes
``Q + (lora_alpha / r)·B·A``, which is ``W`` only when the scaling is 1.

The quantisers are torch references of bitsandbytes' NF4 / int8 (:mod:`peft_kernel_lora.loftq_quant`),
so this runs on CPU and any accelerator; the base model stays a float model holding ``Q``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from peft_kernel.plugin_api import UnsupportedFeatureError
from peft_kernel_lora.loftq_config import loftq_settings
from peft_kernel_lora.loftq_quant import quantize_roundtrip

if TYPE_CHECKING:
    from peft_kernel_lora.layers import LoraLayer


def low_rank_factors(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U·√S, √S·Vᵀ)`` of the rank-``rank`` SVD of ``residual`` ([out, in])."""
    left, singular, right_h = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(torch.diag(singular))
    return left @ root[:, :rank], root[:rank, :] @ right_h


@torch.no_grad()
def loftq_decompose(weight: torch.Tensor, bits: int, rank: int, iterations: int,
                    transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q, A, B)`` for the 2-D ``weight`` in its stored layout, all float32.

    ``Q`` is quantised in the stored layout (what a quantised base layer would hold);
    ``transposed`` says that layout is [in, out] (transformers' ``Conv1D``), so that ``A`` is
    [rank, in] and ``B`` [out, rank] either way."""
    original = weight.to(torch.float32)
    residual = original
    for _ in range(iterations):
        quantised = quantize_roundtrip(residual, bits)
        error = original - quantised
        b, a = low_rank_factors(error.T if transposed else error, rank)
        product = b @ a
        residual = original - (product.T if transposed else product)
    return quantised, a, b


def initialize(layer: LoraLayer, adapter_name: str, loftq_config: Any) -> None:
    """Write ``Q`` into ``layer``'s base weight and the SVD factors into ``adapter_name``'s A / B."""
    from peft_kernel_lora.layers import Linear

    settings = loftq_settings(loftq_config)
    if not isinstance(layer, Linear):
        raise UnsupportedFeatureError(
            f"init_lora_weights='loftq' supports Linear and Conv1D layers only, not {type(layer.base_layer).__name__} "
            "(HF PEFT fails there with a TypeError)"
        )
    base = layer.base_layer.weight
    if not base.dtype.is_floating_point:
        raise TypeError(f"init_lora_weights='loftq' needs a float base weight, got {base.dtype}: LoftQ quantises "
                        "the float model itself (no bitsandbytes model; peft-kernel has no bitsandbytes path)")
    rank = layer.r[adapter_name]
    if rank > min(layer.in_features, layer.out_features):
        raise ValueError(
            f"init_lora_weights='loftq': r={rank} exceeds min(in_features, out_features)="
            f"{min(layer.in_features, layer.out_features)}; the SVD has no more factors (HF PEFT silently creates a "
            "smaller adapter whose saved shapes contradict r)"
        )
    quantised, a, b = loftq_decompose(base.detach(), settings.loftq_bits, rank, settings.loftq_iter,
                                      transposed=layer.fan_in_fan_out)
    with torch.no_grad():
        base.copy_(quantised.to(base.dtype))
        # HF writes the factors in the base's dtype before adapters are autocast to float32
        layer.lora_A[adapter_name].weight.copy_(a.to(base.dtype))
        layer.lora_B[adapter_name].weight.copy_(b.to(base.dtype))


def replace_lora_weights_loftq(peft_model: Any, model_path: Optional[str] = None, adapter_name: str = "default",
                               callback: Optional[Callable[[Any, str], bool]] = None) -> None:
    """HF PEFT's helper re-initialises the LoRA weights of a *bitsandbytes 4-bit* model from the float
    weights in a safetensors file. peft-kernel has no bitsandbytes layers, so there is nothing to
    replace: quantise and initialise in one step with ``init_lora_weights="loftq"`` instead."""
    raise UnsupportedFeatureError(
        "replace_lora_weights_loftq works on models quantised with bitsandbytes (4-bit), which peft-kernel does "
        "not support. Use LoraConfig(init_lora_weights='loftq', loftq_config=LoftQConfig(loftq_bits=4)) on the "
        "float model: it quantises the base weights itself (NF4 / int8 reference quantisers, CPU included)."
    )
