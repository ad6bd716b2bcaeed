"""The inference fast path of a low-rank layer with its active adapters (no ``adapter_names``).

At decode a LoRA layer's own arithmetic is two thin GEMMs of a few microseconds, so the Python
between the layer's ``__call__`` and its kernels decides how close a model gets to its base cost:
the general forward (compile check, routing, adapter mix, adapter filter, base-layer hook check,
per-adapter dtype and bias checks, four method calls) cost ~4% of a decode step at hidden 512.
:func:`inference_forward` does the same arithmetic as the general path's fused branch
(:func:`peft_kernel_lowrank.mixed.add_single`: ``base(x)``, then per adapter one shrink GEMM and
one in-place ``addmm_``, bit for bit) after one pass of checks, and returns ``None`` — the caller
then runs its general forward — whenever that branch would not be the one taken: autograd on,
``torch.compile`` tracing, a mixed batch or an adapter mix in progress, adapters disabled or merged,
extra arguments, a base that is not a hook-free ``nn.Linear``, half precision, mismatched dtypes,
or an adapter whose ``low_rank_factors`` are ``None`` (DoRA, aLoRA, dropout in training...).
Nothing is cached: every call reads the layer's live tensors, so no state can go stale.

Per shape: on a large batch (prefill) the two thin GEMMs cost ``tokens * r * (in + out)``
multiply-adds at a poor rate, while folding the adapters into a temporary weight
(``W + scale * B @ A``, freed after the call) costs ``in * out * r`` once and leaves one GEMM of the
base's size. :data:`FOLD_RATIO` is where folding starts to pay (measured on one AVX2 core: at 2x the
break-even token count it is about even, at 4x it saves a third of the adapter's cost). Folding
changes the rounding (within float32 error of the unfolded sum, as HF PEFT's merged weights do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.plugin_api import current_adapter_mix, current_routing
from peft_kernel_lowrank import mixed

_FULL = (torch.float32, torch.float64)
_hooks = nn.modules.module
_Linear = nn.Linear
_grad_enabled = torch.is_grad_enabled
_compiling = torch.compiler.is_compiling

FOLD_RATIO = 2.5
"""Fold when ``tokens * (in + out) >= FOLD_RATIO * in * out`` (see the module docstring)..."""
FOLD_MAX_ELEMENTS = 1 << 24
"""...and the weight has at most this many elements (the temporary weight is one more copy of it)."""


def inference_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``base(x)`` plus every active adapter's ``scale * B(A(x)) (+ scale * bias)``, or ``None``
    when the general forward must run (see the module docstring)."""
    if (_grad_enabled() or layer._disabled or layer.merged_adapters or _compiling()
            or current_routing() is not None or current_adapter_mix() is not None):
        return None
    base = layer._modules["base_layer"]
    if (type(base) is not _Linear or base._forward_hooks or base._forward_pre_hooks
            or _hooks._global_forward_hooks or _hooks._global_forward_pre_hooks):
        return None
    params = base._parameters
    weight = params["weight"]
    dtype = x.dtype
    if weight.dtype is not dtype or dtype not in _FULL:
        return None
    terms = []
    for name in layer._active_adapters:
        factors = layer.low_rank_factors(name) if layer.has_adapter(name) else None
        if factors is None:
            return None
        a, b, scale = factors
        if a.dtype is not dtype or b.dtype is not dtype:
            return None
        terms.append((a, b, scale, mixed.low_rank_bias(layer, name)))
    if not terms:
        return F.linear(x, weight, params["bias"])
    d_out, d_in = weight.shape
    if x.numel() * (d_in + d_out) >= FOLD_RATIO * d_in * d_out * d_in and d_in * d_out <= FOLD_MAX_ELEMENTS:
        return F.linear(x, *_folded(weight, params["bias"], terms))
    result = F.linear(x, weight, params["bias"])
    if not result.is_contiguous():  # not seen from F.linear; the general path's out-of-place branch handles it
        return None
    for a, b, scale, bias in terms:
        result = mixed.add_fused(result, x, a, b, scale, bias)
    return result


def _folded(weight: torch.Tensor, bias: torch.Tensor | None,
            terms: list[tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W + sum scale * B @ A, bias + sum scale * lora bias)``, new tensors."""
    folded = weight
    for a, b, scale, lora_bias in terms:
        folded = torch.addmm(folded, b, a, alpha=scale) if folded is weight else folded.addmm_(b, a, alpha=scale)
        if lora_bias is not None:
            bias = lora_bias * scale if bias is None else bias + lora_bias * scale
    return folded, bias
