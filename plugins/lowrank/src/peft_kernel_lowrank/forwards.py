"""Forwards for an ``AdapterLayer`` whose adapters are low-rank additions on a linear base.

:class:`LowRankForwards` gives a layer that implements ``low_rank_factors`` (the core's
``LowRankLayer`` protocol) and ``delta`` the fused single-adapter forward and the stacked mixed-batch
kernels of :mod:`peft_kernel_lowrank.mixed`, rounding as HF PEFT does on a base of another dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from peft_kernel_lowrank import compiled, mixed, single
from peft_kernel_lowrank.dense_mixed import dense_mixed_forward


class LowRankForwards:
    """Mixin, listed before ``AdapterLayer``: ``class MyLinear(LowRankForwards, AdapterLayer)``."""

    round_delta_to_base: bool = True
    """On a base of another dtype (float32 adapters on a half-precision model): ``True`` rounds each
    delta to the base dtype before adding it (HF PEFT's DeLoRA, OSF); ``False`` adds it in the
    adapter's dtype and rounds the sum once (HF PEFT's ``result +=``: AdaLoRA)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """:func:`peft_kernel_lowrank.single.inference_forward` where it applies (a layer that
        overrides :meth:`adapted_forward` keeps its own), else the core's forward."""
        if not args and not kwargs and type(self).adapted_forward is LowRankForwards.adapted_forward:
            out = single.inference_forward(self, x)
            if out is not None:
                return out
        return super().forward(x, *args, **kwargs)  # type: ignore[misc]

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus each adapter in turn. On a base of another dtype (float32 adapters on a
        half-precision model) each delta is computed in the adapter's dtype and rounded as
        :attr:`round_delta_to_base` says, as HF PEFT does; otherwise the fused kernel adds it in
        place. Adapters without factors right now take the layer's own ``delta``."""
        result = self.base_layer(x, *args, **kwargs) if args or kwargs else mixed.base_output(self.base_layer, x)
        dtype = result.dtype
        for name in adapters:
            factors = self.low_rank_factors(name)
            if factors is None:
                delta = self.delta(x, name)
                if delta is not None:
                    result = result + delta.to(dtype) if self.round_delta_to_base else (result + delta).to(dtype)
            elif factors[1].dtype != dtype and self.round_delta_to_base:
                a, b, scale = factors
                delta = F.linear(F.linear(x.to(a.dtype), a), b)
                result = result + (delta if scale == 1.0 else delta * scale).to(dtype)
            else:
                result = mixed.add_single(self, result, x, name, factors)
        return result

    def mixed_forward(self, x: torch.Tensor, routing: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One adapter per row through the stacked kernels (no loop over rows); a batch whose rows all
        use one adapter (or none) runs :meth:`adapted_forward`; where the kernels cannot run
        (autograd through the adapters, extra arguments) the core's grouped path does."""
        groups = routing.groups(x.shape[0], x.device)
        if len(groups) == 1:
            (name,) = groups
            return self.adapted_forward(x, [name] if self.has_adapter(name) else [], *args, **kwargs)
        result = dense_mixed_forward(self, x, routing, *args, **kwargs)  # factors bigger than delta W
        if result is None:
            result = mixed.mixed_forward(self, x, routing, *args, **kwargs)
        if result is None:
            result = super().mixed_forward(x, routing, *args, **kwargs)
        return result

    def prepare_compiled(self, order: tuple[str, ...]) -> bool:
        """Refresh the stack a compiled forward reads (:mod:`peft_kernel_lowrank.compiled`)."""
        return compiled.prepare(self, order)

    def compiled_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """Each row's adapter gathered from the stack: what Dynamo traces (no Python-side state)."""
        return compiled.forward(self, x, *args, **kwargs)
