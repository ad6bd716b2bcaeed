"""``LycorisLayer``: the additive layer base LoHa and LoKr build on.

A LyCORIS adapter is a full-size delta weight built from small factors (a Hadamard product for
LoHa, a Kronecker product for LoKr). A method subclass allocates and initialises the factors
(``create_adapter`` / ``reset_adapter``) and rebuilds the unscaled delta in the base weight's
shape (``raw_delta_weight``); this base adds

* ``scaling = alpha / r`` (with ``rank_pattern`` / ``alpha_pattern``),
* the forward through the delta weight (``F.linear`` / ``F.convNd`` on the input, as HF does),
* ``rank_dropout`` (a random mask over the delta's output channels, optionally rescaled by its
  mean) and ``module_dropout`` (skip the whole adapter) — both only in training mode, drawing
  random numbers in the same order as HF PEFT, so a seeded training step gives HF's numbers,
* merge / unmerge through ``delta_weight`` (always without dropout, so unmerge restores exactly),
* mixed batches through the core's grouped path (each row gets its own adapter); a dropped module
  makes ``delta`` return ``None``, which the core skips.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, base_of, pattern_value

SUPPORTED_BASE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""What HF PEFT wraps for LoHa and LoKr (nothing else: no Embedding, Conv3d or GPT-2 Conv1D)."""


def adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """Adapters live in float32 when the base is half precision (HF's ``autocast_adapter_dtype``)."""
    dtype = base_layer.weight.dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def kaiming_uniform(tensor: torch.Tensor) -> None:
    """The default ``nn.Linear`` initialisation (Kaiming-uniform with ``a=sqrt(5)``)."""
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class LycorisLayer(AdapterLayer):
    """Per-adapter bookkeeping, dropout and the forward shared by LoHa and LoKr."""

    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "module_dropout", "rank_dropout_scale")

    def __init__(self, base_layer: nn.Module) -> None:
        if not isinstance(base_layer, SUPPORTED_BASE_LAYERS):
            raise TypeError(f"{type(self).__name__} cannot wrap {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        weight = base_layer.weight
        self.is_conv = isinstance(base_layer, (nn.Conv1d, nn.Conv2d))
        self.out_features, self.in_features = weight.shape[0], weight.shape[1]
        self.kernel_size: tuple[int, ...] = tuple(weight.shape[2:])

    # ---- what a method implements ------------------------------------------------------------
    def create_adapter(self, adapter_name: str, r: int, config: Any) -> None:
        """Allocate the factors of ``adapter_name`` (in ``adapter_layer_names`` containers)."""
        raise NotImplementedError

    def reset_adapter(self, adapter_name: str, init_weights: Any) -> None:
        """Initialise the factors of ``adapter_name`` as HF does for ``init_weights``."""
        raise NotImplementedError

    def raw_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The unscaled delta, already in ``base_layer.weight``'s shape."""
        raise NotImplementedError

    # ---- creation ----------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: Any, module_name: str = "") -> None:
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.alpha)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r!r} (module {module_name!r})")
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
        self.rank_dropout_scale[adapter_name] = self.rescales_rank_dropout(config)
        self.create_adapter(adapter_name, r, config)
        weight = self.base_layer.weight
        for p in self.adapter_parameters(adapter_name):
            p.data = p.data.to(device=weight.device, dtype=adapter_dtype(self.base_layer))
        self.reset_adapter(adapter_name, config.init_weights)

    def hotswap_update(self, adapter_name: str, config: Any, module_name: str = "") -> None:
        alpha = pattern_value(config.alpha_pattern, module_name, config.alpha)
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / self.r[adapter_name]
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
        self.rank_dropout_scale[adapter_name] = self.rescales_rank_dropout(config)

    def rescales_rank_dropout(self, config: Any) -> bool:
        """Whether the rank-dropout mask is divided by its mean (``rank_dropout_scale``)."""
        return bool(getattr(config, "rank_dropout_scale", False))

    def _param(self, container: str, adapter_name: str) -> torch.Tensor | None:
        params = getattr(self, container)
        return params[adapter_name] if adapter_name in params else None

    # ---- the additive protocol ---------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * raw_delta_weight``: what merging adds to the base weight (no dropout)."""
        return self.raw_delta_weight(adapter_name) * self.scaling[adapter_name]

    def _rank_dropped(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        p = self.rank_dropout[adapter_name]
        if not (self.training and p):
            return weight
        keep = (torch.rand(weight.size(0)) > p).to(device=weight.device, dtype=weight.dtype)
        keep = keep.view(-1, *[1] * (weight.dim() - 1))
        if self.rank_dropout_scale[adapter_name]:
            keep = keep / keep.mean()
        return weight * keep

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with ``weight`` in place of its weight and no bias."""
        if not self.is_conv:
            return F.linear(x, weight)
        base = base_of(self)  # the plain conv, also under other adapter layers (mixed models)
        conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
        return conv(x, weight, None, base.stride, base.padding, base.dilation, base.groups)

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        if not self._module_kept(adapter_name):
            return None
        weight = self._rank_dropped(self.delta_weight(adapter_name), adapter_name)
        if x.is_floating_point() and x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        return self.apply_weight(x, weight)

    def _module_kept(self, adapter_name: str) -> bool:
        """``module_dropout``: in training, the adapter is skipped for this forward with that
        probability (one draw per adapter and forward, as HF; none in eval mode)."""
        if not self.training:
            return True
        return bool(torch.rand(1) > self.module_dropout[adapter_name])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}"


def tucker(core: torch.Tensor, w_out: torch.Tensor, w_in: torch.Tensor) -> torch.Tensor:
    """Rebuild a conv kernel from its Tucker factors (``use_effective_conv2d``).

    ``core`` is ``[r, r, *kernel]``, ``w_out`` ``[r, out]``, ``w_in`` ``[r, in]``; the result is
    ``[out, in, *kernel]``: ``sum_ab core[a, b] * w_out[a, o] * w_in[b, i]``.
    """
    return torch.einsum("ab...,bi,ao->oi...", core, w_in, w_out)


def conv_core_shape(r: int, kernel_size: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a Tucker core: HF PEFT keeps it 4-d for Conv1d too (``[r, r, k, 1]``)."""
    return (r, r, *kernel_size) if len(kernel_size) == 2 else (r, r, kernel_size[0], 1)
