"""The layer base of the sparse-coefficient methods: an additive adapter on an ``nn.Linear`` or a
transformers ``Conv1D`` whose ``delta W`` is built dense from the learned coefficients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.plugin_api import AdapterLayer
from peft_kernel_lowrank.adapter_cache import AdapterCache


class SpectralLayer(AdapterLayer):
    """An ``nn.Linear`` or ``Conv1D`` (weight stored ``[in, out]``, ``fan_in_fan_out``) with adapters
    whose ``delta W`` a subclass builds in :meth:`spectral_delta`, in the ``[out, in]`` layout.
    Additive: the core derives forward, several active adapters, mixed batches (each adapter's
    group of rows times its dense ``delta W``, one GEMM per adapter) and merging from it. The dense
    ``delta W`` is built once and reused across forwards while the adapter is unchanged (an
    in-place write, a new tensor, a changed ``scaling`` rebuild it; autograd builds it afresh)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        weight = base_layer.weight
        self.out_features, self.in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        self._delta_cache = AdapterCache()

    def spectral_delta(self, adapter_name: str) -> torch.Tensor:
        """``delta W`` of ``adapter_name`` in the ``[out, in]`` layout."""
        raise NotImplementedError

    def coefficient_matrix(self, values: torch.Tensor, positions: dict[str, torch.Tensor], adapter_name: str) -> torch.Tensor:
        """The ``[out, in]`` matrix, in float32 or wider, that is zero except for ``values`` at the
        adapter's ``positions[adapter_name]`` (``[2, n]`` rows and columns; moved to the values'
        device once, after ``model.to(device)``, and kept there)."""
        if positions[adapter_name].device != values.device:
            positions[adapter_name] = positions[adapter_name].to(values.device)
        rows, cols = positions[adapter_name]
        dtype = torch.promote_types(values.dtype, torch.float32)
        dense = torch.zeros(self.out_features, self.in_features, device=values.device, dtype=dtype)
        return dense.index_put((rows, cols), values.to(dtype))

    def cached_delta(self, adapter_name: str) -> torch.Tensor:
        """:meth:`spectral_delta`, reused while the adapter is unchanged."""
        return self._delta_cache.get(self, adapter_name, lambda: self.spectral_delta(adapter_name))

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return F.linear(x, self.cached_delta(adapter_name).to(x.dtype))

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.cached_delta(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._delta_cache.drop(adapter_name)
