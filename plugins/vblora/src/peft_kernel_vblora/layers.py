"""The VB-LoRA layer for ``nn.Linear`` and transformers' ``Conv1D``, and the adapter's vector bank.

Each adapter of a layer ``[out, in]`` holds logits ``vblora_logits_A [r, in / L, N]`` and
``vblora_logits_B [out / L, r, N]`` (``L = vector_length``, ``N = num_vectors``), and shares with
every other layer of the adapter one bank ``vblora_vector_bank [N, L]``. Each sub-vector of the
LoRA factors is the softmax mixture of its ``topk`` best-scoring bank vectors:
``A[i, jL:(j+1)L] = mix(logits_A[i, j])`` and ``B[jL:(j+1)L, i] = mix(logits_B[j, i])``, and the
adapter adds ``B @ A`` (no scaling) to the weight. The forwards are the low-rank family's kernels on
the composed ``A`` and ``B``. Imported on first use only (it imports torch).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, ConfigError, LowRankFactors, base_of, linear_fan_in_fan_out
from peft_kernel_lowrank import mixed
from peft_kernel_lowrank.derived import DerivedFactors
from peft_kernel_lowrank.forwards import LowRankForwards
from peft_kernel_vblora.config import VBLoRAConfig


def compose(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """``[..., L]``: per row of ``logits [..., N]``, the softmax-weighted sum of the bank vectors
    of its ``topk`` largest logits."""
    best, indices = logits.topk(topk, dim=-1)
    weights = torch.softmax(best, dim=-1)
    return (weights.unsqueeze(-1) * bank[indices]).sum(dim=-2)


def linear_features(base_layer: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a ``Conv1D`` (weight ``[in, out]``),
    ``None`` for other layer types."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if isinstance(base_layer, Conv1D):
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features
    return None


def check_divisible(vector_length: int, module_name: str, features: tuple[int, int]) -> None:
    """Raise :class:`ConfigError` unless ``vector_length`` divides both of a layer's ``features``."""
    for name, size in zip(("in_features", "out_features"), features):
        if size % vector_length:
            raise ConfigError(f"VBLoRAConfig.vector_length ({vector_length}) must divide the in_features and "
                              f"out_features of every targeted layer, but {module_name!r} has {name}={size}")


def make_vector_bank(config: VBLoRAConfig, targets: list[tuple[str, nn.Module]]) -> nn.Parameter:
    """The new adapter's bank ``[num_vectors, vector_length]`` (float32 on the first target's
    device; the core gives it the base dtype), drawn by each layer's :meth:`VBLoRALinear.update_layer`.
    Refuses the adapter (:class:`ConfigError`) when ``vector_length`` does not divide a target's
    features, before anything changes."""
    device = None
    for path, module in targets:
        base = base_of(module)
        features = linear_features(base)
        if features is None:
            continue  # not a layer type VB-LoRA wraps: the core names it when the factory refuses it
        check_divisible(config.vector_length, path, features)
        device = base.weight.device if device is None else device
    return nn.Parameter(torch.zeros(config.num_vectors, config.vector_length, device=device))


class VBLoRALinear(LowRankForwards, AdapterLayer):
    """VB-LoRA for ``nn.Linear`` and ``Conv1D`` (``fan_in_fan_out``: weight stored ``[in, out]``).
    ``vblora_vector_bank`` holds the adapter's shared bank (the same parameter in every layer)."""

    adapter_layer_names = ("vblora_logits_A", "vblora_logits_B", "vblora_vector_bank")
    shared_tensor_names = ("vblora_vector_bank",)
    other_param_names = ("r", "topk", "vblora_dropout")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = linear_features(base_layer)
        self.r: dict[str, int] = {}
        self.topk: dict[str, int] = {}
        self.vblora_dropout = nn.ModuleDict()
        self.vblora_logits_A = nn.ParameterDict()
        self.vblora_logits_B = nn.ParameterDict()
        self.vblora_vector_bank = nn.ParameterDict()
        self._factors = DerivedFactors()

    # ---- creation ---------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: VBLoRAConfig, module_name: str = "",
                     shared: dict[str, torch.Tensor] | None = None) -> None:
        bank = (shared or {}).get("vblora_vector_bank")
        if bank is None:
            raise ValueError(f"VB-LoRA layer {module_name!r} needs the adapter's vector bank (shared tensors)")
        length = bank.shape[1]
        check_divisible(length, module_name, (self.in_features, self.out_features))
        r, num_vectors, std = config.r, bank.shape[0], config.init_logits_std
        logits_a = torch.empty(r, self.in_features // length, num_vectors, device=bank.device, dtype=bank.dtype)
        logits_b = torch.empty(self.out_features // length, r, num_vectors, device=bank.device, dtype=bank.dtype)
        # HF PEFT redraws the shared bank in every layer, before the layer's logits: the same draws
        # in the same order give the same adapter as HF's for one seed
        with torch.no_grad():
            bank.uniform_(-config.init_vector_bank_bound, config.init_vector_bank_bound)
        self.r[adapter_name] = r
        self.topk[adapter_name] = config.topk
        self.vblora_dropout[adapter_name] = nn.Dropout(config.vblora_dropout) if config.vblora_dropout > 0 else nn.Identity()
        self.vblora_logits_A[adapter_name] = nn.Parameter(nn.init.normal_(logits_a, 0.0, std))
        self.vblora_logits_B[adapter_name] = nn.Parameter(nn.init.normal_(logits_b, 0.0, std))
        self.vblora_vector_bank[adapter_name] = bank

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._factors.drop(adapter_name)
        mixed.drop_stack(self)

    # ---- the update ---------------------------------------------------------------------------
    def _sources(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.vblora_logits_A[adapter_name], self.vblora_logits_B[adapter_name],
                self.vblora_vector_bank[adapter_name])

    def _compose_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` composed from the bank."""
        logits_a, logits_b, bank = self._sources(adapter_name)
        r, topk = self.r[adapter_name], self.topk[adapter_name]
        a = compose(logits_a, bank, topk).reshape(r, self.in_features)
        b = compose(logits_b, bank, topk).transpose(1, 2).reshape(self.out_features, r)
        return a, b

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``; without autograd, the same tensors until the logits or the bank change."""
        return self._factors.get(adapter_name, self._sources(adapter_name), lambda: self._compose_factors(adapter_name))

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b = self.factors(adapter_name)
        x = self.vblora_dropout[adapter_name](x.to(a.dtype))
        return (x @ a.T) @ b.T

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.factors(adapter_name)
        weight = b @ a
        return weight.T if self.fan_in_fan_out else weight

    # ---- the low-rank protocol and the fast forwards (see peft_kernel_lowrank.mixed) ----------
    def low_rank_factors(self, adapter_name: str) -> LowRankFactors | None:
        """``(A, B, 1.0)``; ``None`` for live dropout in training and for adapters this layer does
        not hold."""
        if adapter_name not in self.r:
            return None
        if self.training and not isinstance(self.vblora_dropout[adapter_name], nn.Identity):
            return None
        a, b = self.factors(adapter_name)
        return a, b, 1.0

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in adapters:
            factors = self.low_rank_factors(name)
            if factors is None:
                result = result + self.delta(x, name).to(result.dtype)
            else:
                result = mixed.add_single(self, result, x, name, factors)
        return result

def make_layer(config: VBLoRAConfig, adapter_name: str, base_layer: nn.Module, module_name: str,
               shared: dict[str, torch.Tensor] | None = None) -> VBLoRALinear | None:
    """The layer for an ``nn.Linear`` or a ``Conv1D`` (as HF PEFT); ``None`` (the core's named
    error) for any other type."""
    fan_in_fan_out = linear_fan_in_fan_out(config, base_layer)
    if fan_in_fan_out is None:
        return None
    layer = VBLoRALinear(base_layer, fan_in_fan_out=fan_in_fan_out)
    layer.update_layer(adapter_name, config, module_name, shared=shared)
    return layer
