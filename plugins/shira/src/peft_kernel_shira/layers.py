"""The SHiRA layer: additive, with a sparse ``delta W`` (trainable values at fixed positions).

A forward with active adapters adds their values into a copy of the base weight and runs one
``F.linear`` (no second matmul). A mixed batch runs the base layer once on every row, then, per
adapter present, one sparse (CSR) product on that adapter's rows: ``r * (m + n)`` multiply-adds per
token instead of ``m * n`` (rows grouped by the core's routing: a loop over adapters, never over
rows). Imported on first use only (it imports torch).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, BufferDict, ConfigError, Routing, linear_fan_in_fan_out
from peft_kernel_shira.config import MASK_TYPES, ShiraConfig
from peft_kernel_shira.masks import positions_from_mask_fn, random_positions


class ShiraLayer(AdapterLayer):
    """SHiRA on an ``nn.Linear``: ``delta W[rows[k], cols[k]] = shira_weight[k]``, zero elsewhere.
    ``shira_indices`` (int32 ``[2, r * (m + n)]``) is a buffer saved with the adapter, as in HF PEFT."""

    adapter_layer_names = ("shira_weight", "shira_indices")

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.out_features, self.in_features = base_layer.weight.shape
        self.shira_weight = nn.ParameterDict()
        self.shira_indices = BufferDict()

    def update_layer(self, adapter_name: str, config: ShiraConfig, module_name: str = "") -> None:
        count = config.r * (self.out_features + self.in_features)
        if count > self.out_features * self.in_features:
            raise ConfigError(
                f"ShiraConfig.r={config.r} gives module {module_name!r} ({self.out_features} x {self.in_features}) "
                f"r * (out + in) = {count} SHiRA values, more than its {self.out_features * self.in_features} weights; "
                "choose a smaller r"
            )
        if config.mask_fn is not None:
            positions = positions_from_mask_fn(config.mask_fn, self.base_layer, config.r, count,
                                               config.random_seed, module_name)
        else:
            if config.mask_type not in MASK_TYPES:  # a checkpoint being loaded brings its own positions
                warnings.warn(f"ShiraConfig.mask_type={config.mask_type!r} is not a built-in mask {list(MASK_TYPES)} and "
                              f"no config.mask_fn is set: module {module_name!r} gets random positions (loading a "
                              "checkpoint replaces them with its saved shira_indices)", UserWarning, stacklevel=2)
            positions = random_positions(self.out_features, self.in_features, count, config.random_seed)
        weight = self.base_layer.weight
        values = torch.zeros(count) if config.init_weights else torch.randn(count)
        self.shira_weight[adapter_name] = nn.Parameter(values.to(weight.device, weight.dtype))
        self.shira_indices[adapter_name] = positions.to(weight.device)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense ``[out, in]`` ``delta W`` (the sparse values scattered into zeros)."""
        values = self.shira_weight[adapter_name]
        rows, cols = self.shira_indices[adapter_name].long()
        dense = torch.zeros(self.out_features, self.in_features, device=values.device, dtype=values.dtype)
        return dense.index_put((rows, cols), values)

    def adapted_weight(self, adapters: list[str], dtype: torch.dtype) -> torch.Tensor:
        """The base weight in ``dtype`` with every adapter's values added at their positions."""
        weight = self.base_layer.weight.to(dtype)
        for name in adapters:
            rows, cols = self.shira_indices[name].long()
            weight = weight.index_put((rows, cols), self.shira_weight[name].to(dtype), accumulate=True)
        return weight

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``x @ delta W.T`` as a sparse (CSR) product, in float32 or wider (CPU kernels have no
        half-precision CSR product), returned in ``x``'s dtype."""
        values = self.shira_weight[adapter_name]
        dtype = torch.promote_types(torch.promote_types(values.dtype, x.dtype), torch.float32)
        rows, cols = self.shira_indices[adapter_name].long()
        crow = torch.zeros(self.out_features + 1, dtype=torch.long, device=rows.device)
        crow[1:] = torch.bincount(rows, minlength=self.out_features).cumsum(0)
        with warnings.catch_warnings():  # torch flags CSR tensors as beta on first use
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            sparse = torch.sparse_csr_tensor(crow, cols, values.to(dtype), (self.out_features, self.in_features))
        flat = x.reshape(-1, self.in_features).to(dtype)
        return (sparse @ flat.T).T.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        return F.linear(x, self.adapted_weight(adapters, x.dtype), _bias(self.base_layer, x.dtype))

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer once on every row, then each adapter's sparse product added in place to
        its own rows (the generic path's out-of-place ``index_add`` would copy the output per adapter)."""
        result = self.base_layer(x, *args, **kwargs)
        for name, rows in routing.groups(x.shape[0], x.device).items():
            if self.has_adapter(name):
                result.index_add_(0, rows, self.delta(x.index_select(0, rows), name))
        return result


def _bias(base_layer: nn.Linear, dtype: torch.dtype) -> torch.Tensor | None:
    return None if base_layer.bias is None else base_layer.bias.to(dtype)


def make_layer(config: ShiraConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> ShiraLayer | None:
    """The layer for an ``nn.Linear``; ``None`` for any other type (the core then raises a named
    error: HF PEFT's SHiRA supports ``nn.Linear`` only, not GPT-2's ``Conv1D``)."""
    if not isinstance(base_layer, nn.Linear):
        return None
    linear_fan_in_fan_out(config, base_layer)  # HF's warning when fan_in_fan_out=True, which is reset to False
    layer = ShiraLayer(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer
