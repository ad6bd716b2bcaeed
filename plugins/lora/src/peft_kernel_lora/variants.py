"""Where LoRA's linear-layer variants with reshaped factors hook into :mod:`peft_kernel_lora.layers`:
KaSA (:mod:`peft_kernel_lora.kasa`: a diagonal between ``A`` and ``B``) and BD-LoRA
(:mod:`peft_kernel_lora.bdlora`: a block-diagonal ``A`` or ``B``). Such an adapter's dense factors
(``A`` [r, in] with the diagonal folded in, ``B`` [out, r]) are derived from its tensors and cached
while they do not change, so the stacked mixed-batch kernels and merging treat it as plain LoRA."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from peft_kernel_lora import bdlora, kasa

if TYPE_CHECKING:
    from peft_kernel_lora.layers import LoraLayer


def create(layer: LoraLayer, adapter_name: str, r: int, config: Any, module_name: str) -> None:
    """Reshape the factors ``create_adapter`` just made, as ``config`` asks (before they are initialised)."""
    if config.kasa_config is not None:
        kasa.add(layer, adapter_name, r, module_name)
    if config.use_bdlora is not None:
        bdlora.create(layer, adapter_name, r, config, module_name)


def after_init(layer: LoraLayer, adapter_name: str) -> None:
    """Variant-specific initialisation, after ``init_lora_weights`` ran."""
    if adapter_name in layer.derived_factor_adapters:
        bdlora.initialize(layer, adapter_name)


def dense_factors(layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, in], B [out, r])`` of a variant adapter as dense matrices (``lora_diag`` folded into ``A``)."""
    lin_a, lin_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    diag = layer.lora_diag[adapter_name] if adapter_name in layer.lora_diag else None
    sources = (lin_a.weight, lin_b.weight) if diag is None else (lin_a.weight, lin_b.weight, diag)

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        a = bdlora.dense(lin_a)
        return (a if diag is None else diag[:, None] * a), bdlora.dense(lin_b)

    return layer.derived_factors.get(adapter_name, sources, compute)


def drop(layer: LoraLayer, adapter_name: str) -> None:
    """Forget a deleted adapter."""
    layer.derived_factor_adapters.discard(adapter_name)
    layer.derived_factors.drop(adapter_name)
