"""The RoAd layer: the base output rotated and scaled pairwise, ``y -> R y`` (not additive).

Several active adapters apply one after another (activation order). A mixed batch runs the base
layer once and gathers each row's ``(c, s)`` from a table stacked over the adapters present (plus an
identity row for ``__base__``): one elementwise pass per distinct ``group_size``, no loop over rows.
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
        """Per-output-feature ``(c, s)`` of ``adapter_name`` (see :mod:`peft_kernel_road.rotation`)."""
        return coefficients(self.variant[adapter_name], self.road_theta[adapter_name], self.road_alpha[adapter_name],
                            self.out_features, self.group_size[adapter_name])

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
        slots = routing.slots(result.shape[0], result.device, order)
        rows = torch.where(slots < 0, len(order), slots)  # rows without an adapter here: the identity row
        shape = (result.shape[0],) + (1,) * (result.dim() - 2) + (self.out_features,)
        sizes = list(dict.fromkeys(self.group_size[name] for name in order))
        if len(sizes) == 1:
            c, s = (table[rows].view(shape) for table in self._stacked(order, sizes[0], result.device))
            return rotate(result, c, s, sizes[0]).to(result.dtype)
        out = result  # adapters of several group sizes: each size adds its own rows' change
        for group_size in sizes:
            c, s = (table[rows].view(shape) for table in self._stacked(order, group_size, result.device))
            out = out + rotate(result, c - 1, s, group_size)
        return out.to(result.dtype)

    def _stacked(self, order: tuple[str, ...], group_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``[len(order) + 1, out]`` tables of ``c`` and ``s`` of the adapters in ``order``; adapters
        of another ``group_size`` and the last row are the identity (``c = 1, s = 0``)."""
        reference = self.road_alpha[order[0]]
        identity = torch.ones(self.out_features, device=reference.device, dtype=reference.dtype)
        pairs = [self.coefficients(name) if self.group_size[name] == group_size else (identity, identity * 0)
                 for name in order]
        pairs.append((identity, identity * 0))
        return torch.stack([c for c, _ in pairs]).to(device), torch.stack([s for _, s in pairs]).to(device)

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


def make_layer(config: RoadConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> RoadLayer | None:
    """The layer for an ``nn.Linear``; ``None`` for any other type (the core then raises a named error)."""
    if not isinstance(base_layer, nn.Linear):
        return None
    layer = RoadLayer(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer
