"""``init_lora_weights="orthogonal"``: A and B start non-zero with ``B @ A = 0``, base weights untouched.

A random orthogonal ``Q`` [r, r] splits the rank space into two halves: ``A = Q[:, :r/2] @ G_A``
and ``B = G_B @ Q[:, r/2:]ᵀ`` with ``G_A`` [r/2, in] and ``G_B`` [out, r/2] Gaussian of standard
deviation 0.1. The column space of ``A`` is orthogonal to the row space of ``B``, so the adapter
starts as the identity while both factors carry signal (rank r/2 each), hence an even ``r``.
These are the properties and statistics of HF PEFT's initialisation (measured: B·A ≈ 1e-8,
rank r/2 each, Gaussian entries of std 0.1 in those bases); HF's random stream is not
reproduced, so the same seed gives other (equally distributed) weights than HF's.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from peft_kernel_lora.layers import LoraLayer

STD = 0.1
"""Standard deviation of the Gaussian parts ``G_A`` / ``G_B`` (HF's, measured)."""


def initialize(layer: LoraLayer, adapter_name: str) -> None:
    """Set ``layer``'s A and B for ``adapter_name`` as the module docstring says. Embeddings get LoRA's
    default initialisation with a warning (HF falls back silently); convolutions are refused (HF too)."""
    from peft_kernel_lora import init
    from peft_kernel_lora.layers import Embedding, Linear

    if isinstance(layer, Embedding):
        warnings.warn(f"init_lora_weights='orthogonal' is only implemented for linear layers; adapter {adapter_name!r} "
                      "on an nn.Embedding gets the default initialisation (as in HF PEFT).", UserWarning, stacklevel=4)
        init.initialize(layer, adapter_name, True)
        return
    if not isinstance(layer, Linear):
        raise ValueError(f"init_lora_weights='orthogonal' is only supported for linear layers, not "
                         f"{type(layer.base_layer).__name__}.")
    r = layer.r[adapter_name]
    if r % 2:
        raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
    lin_a, lin_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    half = r // 2
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(r, r, device=lin_a.weight.device))
        a = q[:, :half] @ (torch.randn(half, layer.in_features, device=q.device) * STD)
        b = (torch.randn(layer.out_features, half, device=q.device) * STD) @ q[:, half:].T
        lin_a.weight.copy_(a.to(lin_a.weight.dtype))
        lin_b.weight.copy_(b.to(lin_b.weight.dtype))
        if lin_b.bias is not None:
            nn.init.zeros_(lin_b.bias)
