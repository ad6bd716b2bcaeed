"""BD-LoRA: LoRA on linear layers with a block-diagonal ``lora_A`` or ``lora_B``.

A block-diagonal factor of ``nblocks`` blocks stores its blocks stacked along the output axis, as
HF PEFT does: ``weight`` [out, in / nblocks], block ``i`` maps input slice ``i`` to output slice
``i``. Its dense form (``torch.block_diag`` of the blocks) is what merging and the stacked
mixed-batch kernels use. Initialisation (HF's, observed): a block-diagonal ``A`` is Kaiming-uniform
(gain √2) over a block's fan-in, a block-diagonal ``B`` starts at zero whatever ``init_lora_weights``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from peft_kernel_lora.layers import LoraLayer


class BlockDiagonalLinear(nn.Module):
    """A bias-free linear map ``in_features -> out_features`` whose weight is block diagonal."""

    def __init__(self, in_features: int, out_features: int, nblocks: int) -> None:
        super().__init__()
        if in_features % nblocks or out_features % nblocks:
            raise ValueError(f"BD-LoRA: in_features={in_features} and out_features={out_features} of a block-diagonal "
                             f"factor must both be divisible by nblocks={nblocks}")
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks))
        self.register_parameter("bias", None)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def blocks(self) -> torch.Tensor:
        """The weight as [nblocks, out / nblocks, in / nblocks]."""
        n = self.nblocks
        return self.weight.view(n, self.out_features // n, self.in_features // n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.nblocks
        parts = x.reshape(*x.shape[:-1], n, self.in_features // n)
        out = torch.einsum("...ni,noi->...no", parts, self.blocks().to(x.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)

    def dense(self) -> torch.Tensor:
        """The full [out, in] block-diagonal matrix."""
        return torch.block_diag(*self.blocks())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}"


def sides(config: Any, module_name: str) -> tuple[bool, bool]:
    """Whether ``module_name`` gets a block-diagonal A and/or B (a pattern contained in the name),
    checked against ``match_strict`` (HF's rule and message)."""
    settings = config.use_bdlora
    on_a = any(p in module_name for p in settings["target_modules_bd_a"] or [])
    on_b = any(p in module_name for p in settings["target_modules_bd_b"] or [])
    if on_a and on_b:
        raise ValueError(f"BD-LoRA: target {module_name!r} matches both target_modules_bd_a and target_modules_bd_b; "
                         "a module can have a block-diagonal A or B, not both.")
    if settings["match_strict"] and not (on_a or on_b):
        raise ValueError(f"Target {module_name} matches neither A nor B block-diagonal patterns. If this is intentional, "
                         "set match_strict=False in BdLoraConfig during initialization.")
    return on_a, on_b


def create(layer: LoraLayer, adapter_name: str, r: int, config: Any, module_name: str) -> bool:
    """Put block-diagonal factors in ``layer`` for ``adapter_name`` where the config says so; False
    when the module gets plain LoRA (``match_strict=False`` and no pattern matched)."""
    from peft_kernel_lora.layers import Linear

    on_a, on_b = sides(config, module_name)
    if not (on_a or on_b):
        return False
    if not isinstance(layer, Linear) or layer.fan_in_fan_out:
        raise ValueError(f"BD-LoRA (use_bdlora) is only supported for nn.Linear layers, not "
                         f"{type(layer.base_layer).__name__} (module {module_name!r}).")
    nblocks = config.use_bdlora["nblocks"]
    if r % nblocks:
        raise ValueError(f"BD-LoRA: the rank {r} of module {module_name!r} must be divisible by nblocks={nblocks}")
    if on_b and config.lora_bias:
        raise ValueError(f"BD-LoRA: lora_bias=True is not supported with a block-diagonal lora_B (module {module_name!r}); "
                         "HF PEFT silently drops that bias.")
    if on_a:
        layer.lora_A[adapter_name] = BlockDiagonalLinear(layer.in_features, r, nblocks)
    else:
        layer.lora_B[adapter_name] = BlockDiagonalLinear(r, layer.out_features, nblocks)
    layer.derived_factor_adapters.add(adapter_name)
    return True


def initialize(layer: LoraLayer, adapter_name: str) -> None:
    """HF's initialisation of the block-diagonal factor (whatever ``init_lora_weights``)."""
    with torch.no_grad():
        for factor in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
            if isinstance(factor, BlockDiagonalLinear):
                if factor is layer.lora_A[adapter_name]:
                    nn.init.kaiming_uniform_(factor.weight)
                else:
                    nn.init.zeros_(factor.weight)


def dense(factor: nn.Module) -> torch.Tensor:
    """A factor module's weight as a dense [out, in] matrix."""
    return factor.dense() if isinstance(factor, BlockDiagonalLinear) else factor.weight
