"""The C3A layer for ``nn.Linear`` (HF PEFT's only layer type for C3A).

An adapter holds ``c3a_kernel`` of shape ``[out/b, in/b, b]`` (``b`` the block size). Its update
is a block matrix of circulant blocks, scaled by ``1/in_features``::

    delta_W[o*b + r, i*b + c] = kernel[o, i, (c - r) mod b] / in_features

so each output block is a sum over input blocks of circular cross-correlations,
``y_o = sum_i ifft(conj(fft(k_oi)) * fft(x_i)) / in_features``, computed with real FFTs in
``O(b log b)`` per block pair instead of ``O(b^2)`` (:mod:`peft_kernel_c3a.spectral`). It is
additive: the core derives forward, several active adapters and merging from ``delta`` and
``delta_weight``; mixed batches run vectorised over adapters (:meth:`C3ALinear.mixed_forward`).
Half-precision inputs and kernels are transformed in float32 (torch's half-precision FFTs run on
CUDA only, for power-of-two sizes only) and the delta returned in the wider of the two dtypes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, ConfigError, Routing, pattern_value
from peft_kernel_c3a import spectral
from peft_kernel_c3a.config import C3AConfig
from peft_kernel_lowrank.adapter_cache import AdapterCache
from peft_kernel_lowrank.derived import DerivedFactors


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _init_kernel(kernel: torch.Tensor, init_weights: bool | str | None) -> None:
    """HF PEFT's initialisations, drawn in the same order from the same generator."""
    with torch.no_grad():
        if init_weights is True:
            nn.init.zeros_(kernel)
        elif init_weights in (False, None, "xavier_uniform"):
            nn.init.xavier_uniform_(kernel)
        elif init_weights == "kaiming_uniform":
            nn.init.kaiming_uniform_(kernel, a=math.sqrt(5))
        elif init_weights == "gaussian":
            nn.init.normal_(kernel)
        else:  # the config's type check admits nothing else
            raise ConfigError(f"C3AConfig.init_weights: unknown initialisation {init_weights!r}")


class C3ALinear(AdapterLayer):
    """An ``nn.Linear`` with C3A adapters (block-circulant updates applied by FFT)."""

    status_type_names = {"Linear": "C3ALinear"}  # HF PEFT's class name in get_layer_status

    adapter_layer_names = ("c3a_kernel",)
    other_param_names = ("block_size",)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.c3a_kernel = nn.ParameterDict()
        self.block_size: dict[str, int] = {}
        self._spectra = AdapterCache()
        self._stack = DerivedFactors()

    def update_layer(self, adapter_name: str, config: C3AConfig, module_name: str = "") -> None:
        pattern = pattern_value(config.block_size_pattern, module_name, None)
        block_size, field = (config.block_size, "block_size") if pattern is None else (pattern, "block_size_pattern")
        for side, size in (("input", self.in_features), ("output", self.out_features)):
            if size % block_size:
                raise ConfigError(
                    f"C3AConfig.{field}: the block size {block_size} must divide the {side} size {size} of "
                    f"module {module_name or type(self.base_layer).__name__!r} (it divides "
                    f"in_features={self.in_features} and out_features={self.out_features} only when it is a "
                    f"common divisor; gcd={math.gcd(self.in_features, self.out_features)})"
                )
        weight = self.base_layer.weight
        kernel = torch.empty(self.out_features // block_size, self.in_features // block_size, block_size,
                             device=weight.device, dtype=weight.dtype)
        _init_kernel(kernel, config.init_weights)
        self.c3a_kernel[adapter_name] = nn.Parameter(kernel)
        self.block_size[adapter_name] = block_size

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        kernel = self.c3a_kernel[adapter_name]
        dtype = _compute_dtype(x.dtype, kernel.dtype)
        out = spectral.apply(x.reshape(-1, self.in_features).to(dtype), self.spectrum(adapter_name, dtype), kernel.shape[-1])
        return out.reshape(*x.shape[:-1], self.out_features).to(torch.promote_types(x.dtype, kernel.dtype))

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row with its own adapter, vectorised over adapters: the rows are placed per
        adapter in a padded batch and one FFT, one ``bmm`` against the stacked spectra and one
        inverse FFT serve them all (:func:`spectral.apply_padded`). Adapters of different block
        sizes, and groups too unbalanced to pad, take the generic per-group path."""
        groups = {n: rows for n, rows in routing.groups(x.shape[0], x.device).items() if self.has_adapter(n)}
        kernels = [self.c3a_kernel[n] for n in groups]
        if not kernels or len({k.shape for k in kernels}) > 1:
            return super().mixed_forward(x, routing, *args, **kwargs)
        pad = routing.memo(("c3a.padding", x.shape[0], x.device, tuple(groups)),
                           lambda: spectral.padding(list(groups.values()), x.shape[0]))
        if pad is None:
            return super().mixed_forward(x, routing, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        delta = spectral.apply_padded(x, self.stacked_spectra(kernels, x.dtype), kernels[0].shape[-1], pad)
        delta = delta.to(result.dtype)
        if result.requires_grad:
            return result + delta if pad.every_row else result.index_add(0, pad.rows, delta)
        return result.add_(delta) if pad.every_row else result.index_add_(0, pad.rows, delta)

    def spectrum(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        """The adapter's :func:`spectral.spectrum` in ``dtype``; in the kernel's own compute dtype
        (the usual case) computed once and reused across forwards while the kernel is unchanged."""
        kernel = self.c3a_kernel[adapter_name]
        compute = lambda: spectral.spectrum(kernel, self.in_features, dtype)  # noqa: E731
        if dtype != _compute_dtype(kernel.dtype):
            return compute()
        return self._spectra.get(self, adapter_name, compute)

    def stacked_spectra(self, kernels: list[torch.Tensor], input_dtype: torch.dtype) -> torch.Tensor:
        """``[frequencies, adapters, blocks_in, blocks_out]``: the spectra of ``kernels`` (one
        block size) in the compute dtype of them and the input, in one transform of the stacked
        kernels; in the kernels' own compute dtype (the usual case) reused across forwards while
        the batch uses the same kernels, unchanged."""
        dtype = _compute_dtype(input_dtype, *(k.dtype for k in kernels))
        compute = lambda: spectral.spectrum(torch.stack(kernels), self.in_features, dtype)  # noqa: E731
        if dtype != _compute_dtype(*(k.dtype for k in kernels)):
            return compute()
        return self._stack.get("stack", tuple(kernels), compute)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._spectra.drop(adapter_name)
        self._stack.drop("stack")

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        kernel = self.c3a_kernel[adapter_name]
        blocks_out, blocks_in, size = kernel.shape
        positions = torch.arange(size, device=kernel.device)
        index = (positions[None, :] - positions[:, None]) % size  # [r, c] -> (c - r) mod size
        circulant = kernel[:, :, index]  # [blocks_out, blocks_in, size (r), size (c)]
        return circulant.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features) / self.in_features


def make_layer(config: C3AConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> C3ALinear | None:
    """A C3A layer around an ``nn.Linear``; ``None`` for any other type (the core names it)."""
    if not isinstance(base_layer, nn.Linear):
        return None
    layer = C3ALinear(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer
