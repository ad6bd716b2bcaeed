"""AdaLoRA's layers: ``SVDLinear`` (``nn.Linear`` and transformers' ``Conv1D``) and ``SVDConv2d``.

Each adapter holds the SVD-form factors ``lora_A`` ``[r, in]`` (right singular vectors ``Q``),
``lora_E`` ``[r, 1]`` (singular values ``Λ``) and ``lora_B`` ``[out, r]`` (left singular vectors
``P``), and adds ``scaling / (ranknum + 1e-5) * B diag(E) A`` to the base weight, with ``scaling =
lora_alpha`` and ``ranknum`` the adapter's initial rank (a frozen one-element parameter, as in HF
PEFT, never saved). Rank reallocation masks entries of ``E`` in place (see
:mod:`peft_kernel_adalora.allocator`). Imported on first use only (it imports torch).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, LowRankFactors, UnsupportedFeatureError, linear_fan_in_fan_out
from peft_kernel_adalora.config import FACTORS, AdaLoraConfig
from peft_kernel_lowrank import mixed
from peft_kernel_lowrank.derived import DerivedFactors
from peft_kernel_lowrank.forwards import LowRankForwards

EPS = 1e-5
"""Added to ``ranknum`` in the scale, as in HF PEFT."""


def layer_rank(config: AdaLoraConfig, module_name: str, adapter_name: str) -> int:
    """The layer's rank: the kept entries of its ``rank_pattern`` mask (``<module>.lora_E``, with or
    without the adapter name), else ``init_r``."""
    pattern = config.rank_pattern or {}
    for key in (f"{module_name}.lora_E", f"{module_name}.lora_E.{adapter_name}"):
        if key in pattern:
            return sum(bool(kept) for kept in pattern[key])
    return config.init_r


class SVDLayer(AdapterLayer):
    """The per-adapter containers and the SVD-form update, for any base whose weight is an
    ``[out, in]`` matrix once flattened; subclasses say how the update is laid out and applied."""

    adapter_layer_names = FACTORS
    other_param_names = ("ranknum", "r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self._folded = DerivedFactors()

    # ---- creation ---------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: AdaLoraConfig, module_name: str = "") -> None:
        """``init_r`` (or the layer's ``rank_pattern``) triplets; HF PEFT's init: ``E = 0`` and
        ``A``, ``B`` ~ N(0, 0.02²) with ``init_lora_weights=True``, all three ~ N(0, 1) otherwise."""
        r = layer_rank(config, module_name, adapter_name)
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        options = {"device": weight.device, "dtype": dtype}
        a = torch.randn(r, self.in_features, **options)
        e = torch.randn(r, 1, **options)
        b = torch.randn(self.out_features, r, **options)
        if config.init_lora_weights:
            nn.init.zeros_(e)
            nn.init.normal_(a, mean=0.0, std=0.02)
            nn.init.normal_(b, mean=0.0, std=0.02)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Parameter(a)
        self.lora_E[adapter_name] = nn.Parameter(e)
        self.lora_B[adapter_name] = nn.Parameter(b)
        self.ranknum[adapter_name] = nn.Parameter(torch.tensor([float(config.init_r)], **options), requires_grad=False)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._folded.drop(adapter_name)
        self._folded.drop(f"{adapter_name}\0ranknum")
        mixed.drop_stack(self)

    # ---- the update ---------------------------------------------------------------------------
    def scale(self, adapter_name: str) -> float:
        """``scaling / (ranknum + 1e-5)``, read from ``ranknum`` once (no device sync per forward)."""
        ranknum = self.ranknum[adapter_name]
        return self.scaling[adapter_name] / (self._folded.get(f"{adapter_name}\0ranknum", (ranknum,), lambda: float(ranknum)) + EPS)

    def delta_matrix(self, adapter_name: str) -> torch.Tensor:
        """``scale * B diag(E) A`` ``[out, in]`` (flattened input side for convolutions)."""
        a, b, e = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        return (b @ (a * e)) * self.scaling[adapter_name] / (self.ranknum[adapter_name] + EPS)


class SVDLinear(LowRankForwards, SVDLayer):
    """AdaLoRA for ``nn.Linear`` and transformers' ``Conv1D`` (``fan_in_fan_out``: weight ``[in, out]``),
    with the fused and stacked low-rank forwards of ``peft_kernel_lowrank``."""

    status_type_names = {"Linear": "SVDLinear"}
    round_delta_to_base = False  # HF's `result += delta`: float32 adapters on a half base round once

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        weight = base_layer.weight
        in_features, out_features = (weight.shape[0], weight.shape[1]) if fan_in_fan_out else (weight.shape[1], weight.shape[0])
        super().__init__(base_layer, in_features, out_features)
        self.fan_in_fan_out = fan_in_fan_out

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b, e = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        x = self.lora_dropout[adapter_name](x.to(a.dtype))
        return (x @ (a * e).T @ b.T) * self.scaling[adapter_name] / (self.ranknum[adapter_name] + EPS)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.delta_matrix(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    # ---- the low-rank protocol and the fast forwards (see peft_kernel_lowrank) ----------------
    def low_rank_factors(self, adapter_name: str) -> LowRankFactors | None:
        """``(A * E, B, scaling / (ranknum + 1e-5))``. Without autograd the folded ``A * E`` is the
        same tensor until ``A`` or ``E`` changes (a masking step writes ``E`` in place), cached with
        ``ranknum`` read once (one freshness check per call: the stacked kernels call this for every
        adapter on every mixed-batch forward). ``None`` for live dropout in training and for adapters
        this layer does not hold."""
        if adapter_name not in self.r:
            return None
        modules = self._modules  # no Module.__getattr__ on this per-forward path
        if self.training and not isinstance(modules["lora_dropout"]._modules[adapter_name], nn.Identity):
            return None
        a, b, e, ranknum = (modules[n]._parameters[adapter_name] for n in ("lora_A", "lora_B", "lora_E", "ranknum"))
        if torch.is_grad_enabled() and (a.requires_grad or e.requires_grad):
            return a * e, b, self.scale(adapter_name)
        folded, rank = self._folded.get(adapter_name, (a, e, ranknum), lambda: (a * e, float(ranknum)))
        return folded, b, self.scaling[adapter_name] / (rank + EPS)


class SVDConv2d(SVDLayer):
    """AdaLoRA for ``nn.Conv2d``: ``A`` is ``[r, in * kh * kw]``; the update is the convolution with
    the reshaped ``scale * B diag(E) A``, as in HF PEFT."""

    status_type_names = {"Conv2d": "SVDConv2d"}

    def __init__(self, base_layer: nn.Conv2d) -> None:
        kh, kw = base_layer.kernel_size
        super().__init__(base_layer, base_layer.in_channels * kh * kw, base_layer.out_channels)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.delta_matrix(adapter_name).view(self.base_layer.weight.shape)

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        base = self.base_layer
        weight = self.delta_weight(adapter_name)
        x = self.lora_dropout[adapter_name](x.to(weight.dtype))
        return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation, base.groups)


def make_layer(config: AdaLoraConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> SVDLayer | None:
    """``SVDLinear`` for ``nn.Linear`` / ``Conv1D``, ``SVDConv2d`` for an ungrouped ``nn.Conv2d``;
    ``None`` (the core's named error) for any other type, as HF PEFT. Quantized weights are refused."""
    weight = getattr(base_layer, "weight", None)
    if isinstance(weight, torch.Tensor) and not weight.is_floating_point():
        raise UnsupportedFeatureError(f"AdaLoRA cannot adapt {module_name!r}: its weight is {weight.dtype} (quantized); "
                                      "only float nn.Linear, Conv1D and nn.Conv2d layers are supported.")
    fan_in_fan_out = linear_fan_in_fan_out(config, base_layer)
    if fan_in_fan_out is not None:
        layer: SVDLayer = SVDLinear(base_layer, fan_in_fan_out=fan_in_fan_out)
    elif isinstance(base_layer, nn.Conv2d):
        if base_layer.groups != 1:
            raise UnsupportedFeatureError(f"AdaLoRA cannot adapt {module_name!r}: grouped convolutions "
                                          f"(groups={base_layer.groups}) are not supported.")
        layer = SVDConv2d(base_layer)
    else:
        return None
    layer.update_layer(adapter_name, config, module_name)
    return layer
