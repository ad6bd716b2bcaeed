"""(IA)^3 adapter layers: ``nn.Linear`` (and transformers ``Conv1D``), ``nn.Conv1d/2d/3d``.

Each adapter is one vector ``ia3_l``. For a *feedforward* module it scales the layer's input
features, ``base(x * l)``; otherwise it scales the output features, ``base(x) * l`` (bias
included). Several active adapters multiply. Shapes follow HF PEFT so checkpoints are
interchangeable: Linear ``[out, 1]`` / ``[1, in]`` (feedforward), Conv ``[1, C, 1, ...]``.

This is not an additive method: the layer overrides ``adapted_forward``, ``mixed_forward`` and the
merge pair. Mixed batches gather one scaling row per batch row from a stacked table (identity row
for ``"__base__"`` rows and adapters this layer does not hold), so the cost is one elementwise
multiply whatever the number of adapters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, Routing, linear_fan_in_fan_out
from peft_kernel_ia3.config import IA3Config

_TINY = 1e-8


def _adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """Vectors live in float32 when the base is half precision (HF's autocast_adapter_dtype)."""
    dtype = base_layer.weight.dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class IA3Layer(AdapterLayer):
    """State, forward, mixed batches and merging shared by every (IA)^3 layer type."""

    adapter_layer_names = ("ia3_l",)
    other_param_names = ("is_feedforward_for",)
    status_type_prefixed = False  # HF PEFT's get_layer_status shows IA3 layers as a bare "Linear"

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, channel_dim: int) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.channel_dim = channel_dim
        """Axis of the features in the layer's input/output: -1 for linear layers, 1 for convs."""
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward_for: dict[str, bool] = {}

    # ---- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: IA3Config, module_name: str = "") -> None:
        feedforward = config.is_feedforward(module_name)
        size = self.in_features if feedforward else self.out_features
        weight = self.base_layer.weight
        if config.init_ia3_weights:
            vector = torch.ones(size, device=weight.device, dtype=_adapter_dtype(self.base_layer))
        else:
            vector = torch.randn(size, device=weight.device, dtype=_adapter_dtype(self.base_layer))
        self.ia3_l[adapter_name] = nn.Parameter(vector.reshape(self.vector_shape(feedforward)))
        self.is_feedforward_for[adapter_name] = feedforward

    def vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        """HF PEFT's on-disk shape of ``ia3_l`` for this layer type."""
        raise NotImplementedError

    @property
    def is_feedforward(self) -> bool:
        """HF PEFT's layer attribute: whether the (first) adapter scales the input."""
        return next(iter(self.is_feedforward_for.values()), False)

    def vector(self, adapter_name: str) -> torch.Tensor:
        return self.ia3_l[adapter_name].flatten()

    # ---- forward ----------------------------------------------------------------------------
    def _broadcast(self, scale: torch.Tensor, x: torch.Tensor, per_row: bool) -> torch.Tensor:
        """Shape ``scale`` ([C] or [B, C] when ``per_row``) to multiply ``x`` along the feature axis."""
        shape = [1] * x.dim()
        if per_row:
            shape[0] = x.shape[0]
        shape[self.channel_dim] = scale.shape[-1]
        return scale.reshape(shape)

    def _scaled(self, t: torch.Tensor, scale: torch.Tensor | None, per_row: bool = False) -> torch.Tensor:
        if scale is None:
            return t
        return (t.to(scale.dtype) * self._broadcast(scale, t, per_row)).to(t.dtype)

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        scale_in = scale_out = None
        for name in adapters:
            if self.is_feedforward_for[name]:
                scale_in = self.vector(name) if scale_in is None else scale_in * self.vector(name)
            else:
                scale_out = self.vector(name) if scale_out is None else scale_out * self.vector(name)
        return self._scaled(self.base_layer(self._scaled(x, scale_in), *args, **kwargs), scale_out)

    def _table(self, order: tuple[str, ...], feedforward: bool, size: int, like: torch.Tensor) -> torch.Tensor | None:
        """``[len(order) + 1, size]``: each adapter's vector (ones where it scales the other side),
        and a last row of ones that slot ``-1`` (base rows, adapters absent here) picks."""
        if not any(self.is_feedforward_for[a] == feedforward for a in order):
            return None
        ones = torch.ones(size, device=like.device, dtype=like.dtype)
        rows = [self.vector(a) if self.is_feedforward_for[a] == feedforward else ones for a in order]
        return torch.stack([*rows, ones])

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        order = tuple(self.ia3_l.keys())
        if not order:
            return self.base_layer(x, *args, **kwargs)
        slots = routing.slots(x.shape[0], x.device, order)
        like = next(iter(self.ia3_l.values()))
        table_in = self._table(order, True, self.in_features, like)
        table_out = self._table(order, False, self.out_features, like)
        scale_in = None if table_in is None else table_in.index_select(0, slots % table_in.shape[0])
        scale_out = None if table_out is None else table_out.index_select(0, slots % table_out.shape[0])
        result = self.base_layer(self._scaled(x, scale_in, per_row=True), *args, **kwargs)
        return self._scaled(result, scale_out, per_row=True)

    # ---- merge ------------------------------------------------------------------------------
    def weight_scale(self, vector: torch.Tensor, feedforward: bool) -> torch.Tensor:
        """``vector`` shaped to multiply ``base_layer.weight`` (input or output axis)."""
        raise NotImplementedError

    def _rescale(self, adapter_name: str, inverse: bool, safe_merge: bool) -> None:
        vector = self.vector(adapter_name).detach()
        if inverse:
            tiny = torch.full_like(vector, _TINY)
            vector = torch.where(vector.abs() < _TINY, torch.where(vector < 0, -tiny, tiny), vector)
        feedforward = self.is_feedforward_for[adapter_name]
        weight = self.base_layer.weight
        factor = self.weight_scale(vector, feedforward).to(device=weight.device, dtype=weight.dtype)
        bias = self.base_layer.bias if not feedforward else None
        bias_factor = None if bias is None else vector.to(device=bias.device, dtype=bias.dtype)
        with torch.no_grad():
            new_weight = weight / factor if inverse else weight * factor
            new_bias = None if bias is None else (bias / bias_factor if inverse else bias * bias_factor)
            if safe_merge and not (torch.isfinite(new_weight).all() and (new_bias is None or torch.isfinite(new_bias).all())):
                raise ValueError(
                    f"NaNs or infs detected while merging adapter {adapter_name!r} into {type(self).__name__}; "
                    "the adapter is broken and the base weights were left untouched."
                )
            weight.copy_(new_weight)
            if bias is not None:
                bias.copy_(new_bias)

    def merge_into_base(self, adapter_name: str, safe_merge: bool = False) -> None:
        self._rescale(adapter_name, inverse=False, safe_merge=safe_merge)

    def unmerge_from_base(self, adapter_name: str) -> None:
        self._rescale(adapter_name, inverse=True, safe_merge=False)


class Linear(IA3Layer):
    """(IA)^3 for ``nn.Linear`` and transformers' ``Conv1D`` (``fan_in_fan_out``: weight [in, out])."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        weight = base_layer.weight
        in_features, out_features = (weight.shape[0], weight.shape[1]) if fan_in_fan_out else (weight.shape[1], weight.shape[0])
        super().__init__(base_layer, in_features, out_features, channel_dim=-1)
        self.fan_in_fan_out = fan_in_fan_out

    def vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        return (1, self.in_features) if feedforward else (self.out_features, 1)

    def weight_scale(self, vector: torch.Tensor, feedforward: bool) -> torch.Tensor:
        # nn.Linear weight is [out, in]; Conv1D's is [in, out]
        input_axis = 0 if self.fan_in_fan_out else 1
        scales_axis = input_axis if feedforward else 1 - input_axis
        return vector.reshape(-1, 1) if scales_axis == 0 else vector.reshape(1, -1)


class ConvNd(IA3Layer):
    """(IA)^3 for ``nn.Conv1d/2d/3d``: one entry per input (feedforward) or output channel."""

    def __init__(self, base_layer: nn.Module) -> None:
        if base_layer.groups != 1:
            raise NotImplementedError(f"(IA)^3 for grouped convolutions (groups={base_layer.groups}) is not supported")
        super().__init__(base_layer, base_layer.in_channels, base_layer.out_channels, channel_dim=1)
        self.ndim = base_layer.weight.dim() - 2

    def vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        return (1, self.in_features if feedforward else self.out_features, *(1,) * self.ndim)

    def weight_scale(self, vector: torch.Tensor, feedforward: bool) -> torch.Tensor:
        # conv weight is [out, in, *kernel]
        ones = (1,) * self.ndim
        return vector.reshape(1, -1, *ones) if feedforward else vector.reshape(-1, 1, *ones)


def make_layer(config: IA3Config, adapter_name: str, base_layer: nn.Module, module_name: str) -> IA3Layer | None:
    """The (IA)^3 layer for ``base_layer``'s type with ``adapter_name`` added, or None if unsupported."""
    fan_in_fan_out = linear_fan_in_fan_out(config, base_layer)
    if fan_in_fan_out is not None:
        layer: IA3Layer = Linear(base_layer, fan_in_fan_out=fan_in_fan_out)
    elif isinstance(base_layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        layer = ConvNd(base_layer)
    else:
        return None
    layer.update_layer(adapter_name, config, module_name)
    return layer
