"""The FourierFT layer: a :class:`~peft_kernel_spectral.SpectralLayer`, so the core derives forward,
mixed batches and merging from its ``spectral_delta``. Imported on first use only (it imports torch)."""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel.plugin_api import ConfigError, linear_fan_in_fan_out, pattern_value
from peft_kernel_fourierft.config import FourierFTConfig
from peft_kernel_spectral import SpectralLayer, seeded_positions


class FourierFTLayer(SpectralLayer):
    """FourierFT on an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored ``[in, out]``):
    ``delta W = scaling * Re(ifft2(S))``, ``S`` the ``[out, in]`` spectrum that is zero except at
    the adapter's positions, where it holds the learned ``fourierft_spectrum``."""

    status_type_names = {"Linear": "FourierFTLinear"}  # HF PEFT's class name in get_layer_status

    adapter_layer_names = ("fourierft_spectrum",)
    other_param_names = ("n_frequency", "scaling", "indices")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        self.fourierft_spectrum = nn.ParameterDict()
        self.n_frequency: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.indices: dict[str, torch.Tensor] = {}

    def update_layer(self, adapter_name: str, config: FourierFTConfig, module_name: str = "") -> None:
        n_frequency = pattern_value(config.n_frequency_pattern, module_name, config.n_frequency)
        positions = self.out_features * self.in_features
        if n_frequency > positions:
            raise ConfigError(
                f"FourierFTConfig.n_frequency={n_frequency} is larger than the {positions} spectral positions "
                f"of module {module_name!r} ({self.out_features} x {self.in_features}); it must be at most "
                "out_features * in_features (set a smaller n_frequency or an n_frequency_pattern entry)"
            )
        if config.random_loc_seed is None:
            raise ConfigError(f"FourierFTConfig.random_loc_seed is None: module {module_name!r} needs an integer "
                              "seed to draw its spectral positions")
        weight = self.base_layer.weight
        spectrum = torch.zeros(n_frequency) if config.init_weights else torch.randn(n_frequency)
        self.fourierft_spectrum[adapter_name] = nn.Parameter(spectrum.to(weight.device, weight.dtype))
        self.n_frequency[adapter_name] = n_frequency
        self.scaling[adapter_name] = config.scaling
        self.indices[adapter_name] = seeded_positions(config.random_loc_seed, self.out_features,
                                                      self.in_features, n_frequency)

    def spectral_delta(self, adapter_name: str) -> torch.Tensor:
        """``delta W`` in the ``[out, in]`` layout, in float32 (the FFT's precision) or wider."""
        dense = self.coefficient_matrix(self.fourierft_spectrum[adapter_name], self.indices, adapter_name)
        return torch.fft.ifft2(dense).real * self.scaling[adapter_name]


def make_layer(config: FourierFTConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> FourierFTLayer | None:
    """The layer for an ``nn.Linear`` or ``Conv1D``; ``None`` for any other type (the core then
    raises a named error, as HF PEFT supports linear layers only)."""
    fan_in_fan_out = linear_fan_in_fan_out(config, base_layer)
    if fan_in_fan_out is None:
        return None
    layer = FourierFTLayer(base_layer, fan_in_fan_out)
    layer.update_layer(adapter_name, config, module_name)
    return layer
