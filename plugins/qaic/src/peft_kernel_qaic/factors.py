"""One adapter layer reduced to what the graph applies: ``A``, scaled ``B``, and the LoRA extras.

- plain LoRA on a linear: the core's ``LowRankLayer`` protocol (``low_rank_factors`` ->
  ``A`` ``[r, in]``, ``B`` ``[out, r]``, ``scale``), ``low_rank_bias`` for ``lora_bias``
  (added as ``scale * bias``);
- DoRA on a linear: ``f = m / ‖W + s·BA‖`` per output channel (the norm over the input dimension,
  of the bare base weight plus this adapter). At inference the layer computes
  ``W x + b + (f - 1)·W x + f·s·BA x``, i.e. a per-output-column rescale of the base output
  without its bias plus a LoRA whose ``B`` is scaled by ``f`` -- constants per adapter, so a batch
  row can pick its own ``f`` like its own ``A`` / ``B``;
- LoRA on an embedding (``lora_embedding_A`` ``[r, vocab]``, ``lora_embedding_B`` ``[dim, r]``):
  the row ``A[:, token]`` times ``s·B``; with DoRA, ``f`` is per embedding dimension (the norm of
  ``Eᵀ + s·BA`` over the vocabulary), the same per-output-column rescale.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn

from peft_kernel_qaic.errors import AdapterLoadError


@attrs.frozen
class ModuleDelta:
    """One module's part of an adapter, in float32.

    ``a`` ``[r, in]`` (embedding: ``[r, vocab]``), ``b`` ``[out, r]`` with the scaling folded in
    (embedding: ``[dim, r]``), ``bias`` ``[out]`` (``lora_bias``, scaled) or ``None``, ``dora``
    ``[out]`` (DoRA's ``f``) or ``None``.
    """

    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None = None
    dora: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def _dict_get(container: Any, key: str) -> Any:
    return container[key] if container is not None and key in container else None


def _dora_factor(layer: nn.Module, name: str, a: torch.Tensor, b: torch.Tensor, scale: float,
                 base: torch.Tensor) -> torch.Tensor:
    """DoRA's ``f = m / ‖W + s·BA‖`` per output channel; ``base`` is ``W`` as ``[out, in]``."""
    weight = base + scale * (b @ a)
    magnitude = layer.lora_magnitude_vector[name].detach().float().flatten()
    return magnitude / weight.norm(p=2, dim=1)


def read_module(layer: nn.Module, name: str, where: str, module: str) -> ModuleDelta:
    """``layer``'s adapter ``name`` as a :class:`ModuleDelta` (the layer in eval mode)."""
    base = layer.base_layer
    factors = layer.low_rank_factors(name)
    if factors is not None:
        a, b, scale = factors
        bias = layer.low_rank_bias(name) if hasattr(layer, "low_rank_bias") else None
        return ModuleDelta(
            a=a.detach().float().contiguous(),
            b=(b.detach().float() * scale).contiguous(),
            bias=None if bias is None else (bias.detach().float() * scale).contiguous(),
        )
    scaling = getattr(layer, "scaling", {})
    scale = scaling.get(name) if isinstance(scaling, dict) else None
    emb_a, emb_b = _dict_get(getattr(layer, "lora_embedding_A", None), name), _dict_get(getattr(layer, "lora_embedding_B", None), name)
    if isinstance(base, nn.Embedding) and emb_a is not None and scale is not None:
        a, b = emb_a.detach().float(), emb_b.detach().float()
        f = None
        if getattr(layer, "use_dora", {}).get(name):  # per embedding dimension: the norm runs over the vocabulary
            f = _dora_factor(layer, name, a, b, scale, base.weight.detach().float().t())
        return ModuleDelta(a=a.contiguous(), b=(b * scale).contiguous(), dora=f)
    lin_a, lin_b = _dict_get(getattr(layer, "lora_A", None), name), _dict_get(getattr(layer, "lora_B", None), name)
    if (isinstance(base, nn.Linear) and getattr(layer, "use_dora", {}).get(name) and lin_a is not None
            and scale is not None):
        a, b = lin_a.weight.detach().float(), lin_b.weight.detach().float()
        f = _dora_factor(layer, name, a, b, scale, base.weight.detach().float())
        return ModuleDelta(a=a.contiguous(), b=(b * scale).contiguous(), dora=f.contiguous())
    raise AdapterLoadError(f"adapter {where}: {module} ({type(base).__name__}) is not a LoRA the qaic backend exports")
