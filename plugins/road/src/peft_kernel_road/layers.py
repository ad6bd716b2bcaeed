"""The RoAd layer: the base output rotated and scaled pairwise, ``y -> R y`` (not additive).

Several active adapters apply one after another (activation order). An adapter's ``(c, s)`` is
computed once and reused while its parameters are unchanged. A mixed batch runs the base layer once
and gathers each row's ``(c, s)`` from a table stacked over the adapters present (plus an identity
row for ``__base__``), also kept while its adapters are unchanged: one elementwise pass per distinct
``group_size``, no loop over rows.
Merging rewrites ``W <- R W`` and ``b <- R b``; unmerging applies the exact inverse of ``R``.
Imported on first use only (it imports torch).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, ConfigError, Routing
from peft_kernel_road.config import VARIANTS, RoadConfig
from peft_kernel_road.rotation import coefficients, inverse, rotate
from peft_kernel_lowrank.adapter_cache import AdapterCache
from peft_kernel_lowrank.derived import DerivedFactors


class RoadLayer(AdapterLayer):
    """RoAd on an ``nn.Linear`` (HF PEFT's only layer type for RoAd)."""

    adapter_layer_names = ("road_theta", "road_alpha")
    other_param_names = ("variant", "group_size")

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.out_features = base_layer.out_features
        self.road_theta, self.road_alpha = nn.ParameterDict(), nn.ParameterDict()
        self.variant: dict[str, str] = {}
        self.group_size: dict[str, int] = {}
        self._coefficients = AdapterCache()
        self._tables = DerivedFactors()

    def update_layer(self, adapter_name: str, config: RoadConfig, module_name: str = "") -> None:
        if self.out_features % config.group_size:
            raise ConfigError(f"RoadConfig.group_size={config.group_size} does not divide out_features="
                              f"{self.out_features} of module {module_name!r}; choose a group_size that divides "
                              "the output size of every targeted layer")
        size = self.out_features * VARIANTS[config.variant] // 2
        if config.init_weights:  # the identity: no rotation, unit scale
            theta, alpha = torch.zeros(size), torch.ones(size)
        else:
            theta, alpha = torch.randn(size) * 0.5, 1 + torch.randn(size) * 0.5
        weight = self.base_layer.weight
        self.road_theta[adapter_name] = nn.Parameter(theta.to(weight.device, weight.dtype))
        self.road_alpha[adapter_name] = nn.Parameter(alpha.to(weight.device, weight.dtype))
        self.variant[adapter_name] = config.variant
        self.group_size[adapter_name] = config.group_size

    def coefficients(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-output-feature ``(c, s)`` of ``adapter_name`` (see :mod:`peft_kernel_road.rotation`),
        reused across forwards while the adapter's parameters are unchanged."""
        return self._coefficients.get(self, adapter_name, lambda: coefficients(
            self.variant[adapter_name], self.road_theta[adapter_name], self.road_alpha[adapter_name],
            self.out_features, self.group_size[adapter_name]))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._coefficients.drop(adapter_name)
        self._tables.keep([])

    # ---- forward ----------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for name in adapters:
            c, s = self.coefficients(name)
            result = rotate(result, c, s, self.group_size[name])
        return result.to(dtype)

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        order = tuple(name for name in routing.unique if self.has_adapter(name))
        if not order:
            return result
        rows = routing.memo(("road.rows", result.shape[0], result.device, order),
                            lambda: _table_rows(routing.slots(result.shape[0], result.device, order), len(order)))
        shape = (result.shape[0],) + (1,) * (result.dim() - 2) + (self.out_features,)
        sizes = list(dict.fromkeys(self.group_size[name] for name in order))
        out = result  # adapters of several group sizes: each size adds its own rows' change
        for group_size in sizes:
            picked = self._table(order, group_size).to(result.device).index_select(0, rows)  # [batch, 2, out]
            c, s = picked[:, 0].view(shape), picked[:, 1].view(shape)
            if len(sizes) == 1:
                return rotate(result, c, s, group_size).to(result.dtype)
            out = out + rotate(result, c - 1, s, group_size)
        return out.to(result.dtype)

    def _table(self, order: tuple[str, ...], group_size: int) -> torch.Tensor:
        """``[len(order) + 1, 2, out]``: each adapter's ``c`` and ``s`` stacked, adapters of another
        ``group_size`` and the last row the identity (``c = 1, s = 0``); reused while the batch uses
        the same, unchanged adapters."""
        theta, alpha = (self._modules[n]._parameters for n in self.adapter_layer_names)  # no Module.__getattr__
        sources = tuple(t for name in order for t in (theta[name], alpha[name]))

        def build() -> torch.Tensor:
            identity = torch.ones(2, self.out_features, dtype=sources[1].dtype, device=sources[1].device)
            identity[1] = 0
            rows = [torch.stack(self.coefficients(name)) if self.group_size[name] == group_size else identity
                    for name in order]
            return torch.stack([*rows, identity])

        return self._tables.get(str(group_size), sources, build)

    # ---- merge ------------------------------------------------------------------------------
    def merge_into_base(self, adapter_name: str, safe_merge: bool = False) -> None:
        c, s = self.coefficients(adapter_name)
        self._apply_to_base(adapter_name, c, s, safe_merge)

    def unmerge_from_base(self, adapter_name: str) -> None:
        c, s = self.coefficients(adapter_name)
        c, s = inverse(c.double(), s.double(), self.group_size[adapter_name])
        self._apply_to_base(adapter_name, c, s, safe=True, undo=True)

    def _apply_to_base(self, adapter_name: str, c: torch.Tensor, s: torch.Tensor, safe: bool, undo: bool = False) -> None:
        """``W <- R W`` and ``b <- R b`` for the map ``(c, s)``, computed in float64 out of place;
        with ``safe``, non-finite results raise (naming the adapter) and leave the weights as they were."""
        group_size = self.group_size[adapter_name]
        weight, bias = self.base_layer.weight, self.base_layer.bias
        with torch.no_grad():
            c, s = c.detach().double().to(weight.device), s.detach().double().to(weight.device)
            new_weight = rotate(weight.double().T, c, s, group_size).T
            new_bias = None if bias is None else rotate(bias.double(), c, s, group_size)
            if safe and not (torch.isfinite(new_weight).all() and (new_bias is None or torch.isfinite(new_bias).all())):
                what = "unmerging (its rotation is singular: a scale is 0)" if undo else "merging"
                raise ValueError(f"NaNs or infs detected while {what} adapter {adapter_name!r} in {type(self).__name__}; "
                                 "the base weights were left untouched.")
            weight.copy_(new_weight.to(weight.dtype))
            if new_bias is not None:
                bias.copy_(new_bias.to(bias.dtype))


def _table_rows(slots: torch.Tensor, adapters: int) -> torch.Tensor:
    """Each row's entry in a table of ``adapters`` rows plus the identity: rows without an adapter
    here (slot ``-1``) read the identity."""
    return torch.where(slots < 0, adapters, slots)


def make_layer(config: RoadConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> RoadLayer | None:
    """The layer for an ``nn.Linear``; ``None`` for any other type (the core then raises a named error)."""
    if not isinstance(base_layer, nn.Linear):
        return None
    layer = RoadLayer(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer
