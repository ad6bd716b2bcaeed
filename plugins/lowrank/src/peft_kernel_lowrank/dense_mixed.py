"""Mixed batches through each adapter's dense ``delta W`` for low-rank layers whose factors hold
more numbers than ``delta W`` itself (RandLora's rank reaches the layer's smaller side), for layer
classes that opt in with ``dense_mixed_batches = True`` (rounding differs from the factored
product; OSF's conformance tolerance is not met on the toy mlp, so it does not opt in yet): the
stacked kernels would gather ``rank * (in + out)`` numbers per row, a dense product reads
``in * out`` per adapter group. ``B @ A`` is built once per adapter and reused across forwards
while the factors are the same, unwritten tensors (:class:`DerivedFactors`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from peft_kernel_lowrank import mixed
from peft_kernel_lowrank.derived import DerivedFactors


def dense_is_smaller(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``A [k, in]`` and ``B [out, k]`` hold at least as many numbers as ``B @ A``."""
    return a.shape[0] * (a.shape[1] + b.shape[0]) >= a.shape[1] * b.shape[0]


def dense_mixed_forward(layer: Any, x: torch.Tensor, routing: Any, *args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The base output with each adapter group's rows times its dense ``delta W`` added, outside
    training, when every adapter the batch uses here has factors, no bias and factors at least as
    big as ``delta W``; ``None`` otherwise (the caller's paths run)."""
    if layer.training or not getattr(type(layer), "dense_mixed_batches", False):
        return None
    groups = routing.groups(x.shape[0], x.device)
    held = {name: rows for name, rows in groups.items() if layer.has_adapter(name)}
    if len(groups) == 1 or not held:
        return None
    factors = {name: layer.low_rank_factors(name) for name in held}
    if any(f is None or not dense_is_smaller(f[0], f[1]) or mixed.low_rank_bias(layer, name) is not None
           for name, f in factors.items()):
        return None
    cache = layer.__dict__.setdefault("_dense_deltas", DerivedFactors())
    cache.keep(layer.adapter_names())
    result = layer.base_layer(x, *args, **kwargs)
    for name, rows in held.items():
        a, b, scale = factors[name]
        weight = cache.get(name, (a, b), lambda a=a, b=b: b @ a)
        delta = F.linear(x.index_select(0, rows).to(weight.dtype), weight)
        result.index_add_(0, rows, (delta if scale == 1.0 else delta * scale).to(result.dtype))
    return result
