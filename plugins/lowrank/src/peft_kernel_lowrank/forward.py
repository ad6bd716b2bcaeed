"""The forwards of a low-rank layer over a linear-like base (``nn.Linear``, transformers'
``Conv1D``), written once for every layer implementing ``low_rank_factors`` (and ``delta`` for the
cases where the factors are ``None``): one or several active adapters, and mixed batches through
the stacked kernels of :mod:`peft_kernel_lowrank.mixed`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from peft_kernel_lowrank import mixed

if TYPE_CHECKING:
    from peft_kernel.plugin_api import AdapterLayer, Routing


def adapted_forward(layer: AdapterLayer, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
    """Base output plus each adapter in turn: the fused kernel where the factors exist, the layer's
    own ``delta`` otherwise. On a base of another dtype (float32 adapters on a half-precision model)
    each delta is added in the adapter's dtype and the sum rounded once, as HF PEFT's ``result +=``."""
    result = layer.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    for name in adapters:
        factors = layer.low_rank_factors(name)
        if factors is None:
            result = (result + layer.delta(x, name)).to(dtype)
        else:
            result = mixed.add_single(layer, result, x, name, factors)
    return result


def mixed_forward(layer: AdapterLayer, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
    """One adapter per row: a batch whose rows all use one adapter (or none) runs
    :func:`adapted_forward`; otherwise the stacked kernels, or the core's generic path where they
    cannot run (autograd through the adapters, extra arguments)."""
    groups = routing.groups(x.shape[0], x.device)
    if len(groups) == 1:
        (name,) = groups
        return adapted_forward(layer, x, [name] if name in layer.adapter_names() else [], *args, **kwargs)
    result = mixed.mixed_forward(layer, x, routing, *args, **kwargs)
    if result is None:
        from peft_kernel.plugin_api import AdapterLayer

        result = AdapterLayer.mixed_forward(layer, x, routing, *args, **kwargs)
    return result
