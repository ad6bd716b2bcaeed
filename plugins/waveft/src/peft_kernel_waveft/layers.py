"""The WaveFT layer: a :class:`~peft_kernel_spectral.SpectralLayer`, so the core derives forward,
mixed batches (each adapter's group of rows times its dense ``delta W``, one GEMM per adapter) and
merging from its ``spectral_delta``. Imported on first use only (it imports torch)."""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel.plugin_api import ConfigError, base_of, linear_fan_in_fan_out, pattern_value
from peft_kernel_spectral import SpectralLayer, seeded_positions
from peft_kernel_waveft.config import WaveFTConfig
from peft_kernel_waveft.wavelets import inverse_dwt2

SIZES = "waveft_target_sizes"
"""The ``shared`` entry with ``proportional_parameters``: ``[number of targets, their total elements]``."""


def target_sizes(targets: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """The adapter's targets' count and total weight elements, for :func:`proportional_count`."""
    total = sum(base_of(module).weight.numel() for _, module in targets)
    return {SIZES: torch.tensor([len(targets), total], dtype=torch.float64)}


def proportional_count(n_frequency: int, elements: int, sizes: torch.Tensor) -> int:
    """HF PEFT's ``proportional_parameters`` share of one layer with ``elements`` weight elements:
    ``max(1, round(n_frequency * layers * (elements / total)))``, in this order of operations
    (round half to even), so a tie rounds as HF's."""
    layers, total = (int(v) for v in sizes.tolist())
    return max(1, round(n_frequency * layers * (elements / total)))


class WaveFTLayer(SpectralLayer):
    """WaveFT on an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored ``[in, out]``):
    ``delta W = scaling * IDWT2(C)``, ``C`` the ``[out, in]`` coefficient matrix that is zero except
    at the adapter's seeded positions, where it holds the learned ``waveft_spectrum``."""

    status_type_names = {"Linear": "WaveFTLinear"}  # HF PEFT's class name in get_layer_status

    adapter_layer_names = ("waveft_spectrum",)
    other_param_names = ("waveft_n_frequency", "waveft_scaling", "waveft_wavelet_family", "waveft_use_idwt",
                         "waveft_random_loc_seed", "waveft_indices")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        self.waveft_spectrum = nn.ParameterDict()
        self.waveft_n_frequency: dict[str, int] = {}
        self.waveft_scaling: dict[str, float] = {}
        self.waveft_wavelet_family: dict[str, str] = {}
        self.waveft_use_idwt: dict[str, bool] = {}
        self.waveft_random_loc_seed: dict[str, int] = {}
        self.waveft_indices: dict[str, torch.Tensor] = {}

    def update_layer(self, adapter_name: str, config: WaveFTConfig, module_name: str = "",
                     shared: dict[str, torch.Tensor] | None = None) -> None:
        positions = self.out_features * self.in_features
        if config.proportional_parameters:
            n_frequency, field = proportional_count(config.n_frequency, positions, shared[SIZES]), "n_frequency"
        else:
            pattern = pattern_value(config.n_frequency_pattern, module_name, None)
            n_frequency, field = (config.n_frequency, "n_frequency") if pattern is None else (pattern, "n_frequency_pattern")
        if n_frequency > positions:
            raise ConfigError(
                f"WaveFTConfig.{field}: {n_frequency} coefficients for module {module_name!r} are more than its "
                f"{positions} weight positions ({self.out_features} x {self.in_features}); it must be at most "
                "out_features * in_features (set a smaller n_frequency or an n_frequency_pattern entry)"
            )
        weight = self.base_layer.weight
        spectrum = torch.zeros(n_frequency) if config.init_weights else torch.randn(n_frequency) * 0.01
        self.waveft_spectrum[adapter_name] = nn.Parameter(spectrum.to(weight.device, weight.dtype))
        self.waveft_n_frequency[adapter_name] = n_frequency
        self.waveft_scaling[adapter_name] = config.scaling
        self.waveft_wavelet_family[adapter_name] = config.wavelet_family
        self.waveft_use_idwt[adapter_name] = config.use_idwt
        self.waveft_random_loc_seed[adapter_name] = config.random_loc_seed
        self.waveft_indices[adapter_name] = seeded_positions(config.random_loc_seed, self.out_features,
                                                             self.in_features, n_frequency)

    def spectral_delta(self, adapter_name: str) -> torch.Tensor:
        """``delta W`` in the ``[out, in]`` layout, in float32 or wider (the transform's precision)."""
        dense = self.coefficient_matrix(self.waveft_spectrum[adapter_name], self.waveft_indices, adapter_name)
        if self.waveft_use_idwt[adapter_name]:
            dense = inverse_dwt2(dense, self.waveft_wavelet_family[adapter_name])
        return dense * self.waveft_scaling[adapter_name]


def make_layer(config: WaveFTConfig, adapter_name: str, base_layer: nn.Module, module_name: str,
               shared: dict[str, torch.Tensor] | None = None) -> WaveFTLayer | None:
    """The layer for an ``nn.Linear`` or ``Conv1D``; ``None`` for any other type (the core then
    raises a named error, as HF PEFT supports linear layers only)."""
    fan_in_fan_out = linear_fan_in_fan_out(config, base_layer)
    if fan_in_fan_out is None:
        return None
    layer = WaveFTLayer(base_layer, fan_in_fan_out)
    layer.update_layer(adapter_name, config, module_name, shared=shared)
    return layer
