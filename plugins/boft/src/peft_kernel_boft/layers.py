"""BOFT adapter layers: ``nn.Linear`` and ``nn.Conv2d`` (HF PEFT's layer types).

A BOFT adapter holds ``boft_R`` ``[m, D, b, b]`` (one unconstrained matrix per block of each of the
``m`` butterfly factors; its skew part ``(R - R^T) / 2`` goes through the exact Cayley transform) and
``boft_s``, one scale per output (``[out, 1]`` for Linear, ``[1, out]`` for Conv2d, HF's shapes).
With ``R`` the butterfly rotation of the input features (:mod:`peft_kernel_orthogonal.butterfly`):

* Linear: ``y = (x R) W^T * s + bias`` -- the input is rotated, then the base layer runs; merged
  weight ``W R^T * s``.
* Conv2d: the rotation acts on the flattened ``in_channels / groups * kh * kw`` kernel features,
  ``W' = W.flatten(1) R^T * s``, and the base convolution runs with ``W'`` (its stride, padding,
  dilation, groups and padding mode; HF 0.21.2's unmerged forward uses only ``stride[0]`` and
  ``padding[0]``, zero padding and no dilation, and refuses non-square kernels and groups).

Several active adapters ``[a, b]`` act as HF's do: ``x R_b R_a`` (the last adapter rotates first),
scales multiplied; merging folds ``a`` then ``b``, so merged == unmerged. Unmerging divides by the
scale and applies the exact inverse rotation, computed in float64.

Linear forwards pick the cheaper of two exact forms: rotating the input's rows, or (more tokens
than output features per weight to fold) folding the rotation into the weight -- never a dense
``d x d`` matrix (HF builds one per forward).

Mixed batches: each row is rotated by its own adapter's blocks, gathered per row (one gather per
group of adapters sharing a block layout; ``"__base__"`` rows get identity blocks) and scaled by
its own ``boft_s``, and the base Linear runs once; with many tokens per adapter, each adapter group
runs with its folded weight instead. Conv2d runs one convolution per adapter group.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.plugin_api import ConfigError, Routing
from peft_kernel_boft.config import BOFTConfig
from peft_kernel_orthogonal.butterfly import (
    apply_butterfly,
    apply_row_butterfly,
    butterfly_dropout,
    butterfly_problem,
)
from peft_kernel_orthogonal.layer import RotationLayer, adapter_dtype
from peft_kernel_orthogonal.rotation import cayley

Layout = tuple[int, int, int]
"""``(factors, blocks, block size)`` of one adapter."""


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[B, out]`` shaped to broadcast over ``like[B, ..., out]``."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 2)), values.shape[-1])


class BOFTLayer(RotationLayer):
    """State and bookkeeping shared by the BOFT layer types (see the module docstring)."""

    adapter_layer_names = ("boft_R", "boft_s")
    other_param_names = ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout")
    merge_reversed = False  # [a, b] merged is W R_a^T R_b^T: a folds in first
    features_text = "input features"

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.boft_R, self.boft_s = nn.ParameterDict(), nn.ParameterDict()
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_n_butterfly_factor: dict[str, int] = {}
        self.boft_dropout: dict[str, float] = {}

    def scale_shape(self) -> tuple[int, int]:
        """``boft_s``'s shape (HF's, per layer type)."""
        raise NotImplementedError

    # ---- creation --------------------------------------------------------------------------
    def _layout(self, config: BOFTConfig, module_name: str) -> tuple[int, int]:
        """``(block count, block size)`` for this layer, or a ``ConfigError`` naming the field."""
        features, factors = self.in_features, config.boft_n_butterfly_factor
        if config.boft_block_size:
            field, value, size = "boft_block_size", config.boft_block_size, config.boft_block_size
        else:
            field, value = "boft_block_num", config.boft_block_num
            size = features // value if features % value == 0 else 0
        problem = (f"the block count ({value}) must divide the features ({features})" if size == 0
                   else butterfly_problem(features, size, factors))
        if problem:
            raise ConfigError(
                f"BOFTConfig.{field}={value} with boft_n_butterfly_factor={factors} does not fit module {module_name!r} "
                f"({features} {self.features_text}): {problem}"
            )
        return features // size, size

    def update_layer(self, adapter_name: str, config: BOFTConfig, module_name: str = "") -> None:
        num, size = self._layout(config, module_name)
        factors = config.boft_n_butterfly_factor
        weight = self.base_layer.weight
        kind = {"device": weight.device, "dtype": adapter_dtype(self.base_layer)}
        rotation, scale = torch.zeros(factors, num, size, size, **kind), torch.ones(self.scale_shape(), **kind)
        if not config.init_weights:
            nn.init.normal_(rotation, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        self.boft_R[adapter_name] = nn.Parameter(rotation)
        self.boft_s[adapter_name] = nn.Parameter(scale)
        self.boft_block_size[adapter_name], self.boft_block_num[adapter_name] = size, num
        self.boft_n_butterfly_factor[adapter_name] = factors
        self.boft_dropout[adapter_name] = config.boft_dropout

    # ---- the rotation ------------------------------------------------------------------------
    def layout(self, adapter_name: str) -> Layout:
        return tuple(self.boft_R[adapter_name].shape[:3])  # type: ignore[return-value]

    def blocks(self, adapter_name: str, dropout: bool = True) -> torch.Tensor:
        """The rotation blocks ``[m, D, b, b]``: Cayley transforms of ``boft_R``'s skew parts (in
        training, ``boft_dropout`` swaps blocks of one random factor for the identity)."""
        raw = self.boft_R[adapter_name]
        skew = 0.5 * (raw - raw.transpose(-1, -2))
        rotation = cayley(skew.flatten(0, 1), use_neumann=False, terms=0).reshape(raw.shape)
        p = self.boft_dropout[adapter_name]
        if dropout and self.training and p > 0:
            rotation = butterfly_dropout(rotation, p)
        return rotation

    def block_size(self, adapter_name: str) -> int:
        return self.boft_block_size[adapter_name]

    def scale(self, adapter_name: str) -> torch.Tensor:
        """``boft_s`` as one value per output ``[out]``."""
        return self.boft_s[adapter_name].reshape(-1)

    def fold(self, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``W R^T`` on the flattened weight (rows: outputs)."""
        return apply_butterfly(weight.flatten(1), blocks, transpose=True).reshape(weight.shape)

    def _out_scaled(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))

    def folded(self, weight: torch.Tensor, adapter_name: str, dropout: bool = True) -> torch.Tensor:
        """``weight`` (in the rotation dtype) with ``adapter_name`` folded in: ``W R^T * s``."""
        return self._out_scaled(self.fold(weight, self.blocks(adapter_name, dropout)), self.scale(adapter_name))

    def rotate(self, t: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """``t[..., in_features]`` rotated as HF's active ``adapters`` are: the last one first."""
        h = t.to(self.rotation_dtype())
        for name in reversed(adapters):
            h = apply_butterfly(h, self.blocks(name).to(h.dtype))
        return h.to(t.dtype)

    def rotate_rows(self, t: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``t[B, ..., in_features]``, each row rotated by its own adapter: per block layout, the
        rows' blocks gathered from a stack of that layout's adapters (identity for other rows)."""
        by_layout: dict[Layout, list[str]] = {}
        for name in self.adapter_names():
            by_layout.setdefault(self.layout(name), []).append(name)
        h = t.to(self.rotation_dtype())
        single = len(by_layout) == 1
        out = h if single else h.clone()
        for layout, names in by_layout.items():
            order = tuple(names)
            stacked = torch.stack([self.blocks(n).to(h.dtype) for n in order])  # [n, m, D, b, b]
            eye = torch.eye(layout[-1], device=h.device, dtype=h.dtype).expand_as(stacked[0])
            stacked = torch.cat([stacked, eye.unsqueeze(0)])
            slots = routing.slots(t.shape[0], t.device, order)
            if single:
                return apply_row_butterfly(h, stacked.index_select(0, slots % stacked.shape[0])).to(t.dtype)
            rows = torch.nonzero(slots >= 0).flatten()
            if rows.numel():
                part = apply_row_butterfly(h.index_select(0, rows), stacked.index_select(0, slots.index_select(0, rows)))
                out.index_copy_(0, rows, part)
        return out.to(t.dtype)

    def row_scales(self, batch: int, routing: Routing, device: torch.device) -> torch.Tensor:
        """``[B, out]``: each row's adapter's ``boft_s`` (ones for rows of no adapter here)."""
        order = tuple(self.adapter_names())
        stacked = torch.stack([self.scale(n) for n in order])
        stacked = torch.cat([stacked, torch.ones_like(stacked[:1])])
        return stacked.index_select(0, routing.slots(batch, device, order) % stacked.shape[0])

    # ---- folded weights ------------------------------------------------------------------------
    def with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's operation on ``x`` with ``weight`` in place of its own."""
        raise NotImplementedError

    def effective_weight(self, adapters: list[str]) -> torch.Tensor:
        """The base weight with ``adapters`` folded in, in merge order (== their unmerged forward)."""
        weight = self.base_layer.weight
        w = weight.to(self.rotation_dtype())
        for name in adapters:
            w = self.folded(w, name)
        return w.to(weight.dtype)

    def grouped_forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Mixed batch by adapter groups: one folded weight and one base operation per group."""
        result: torch.Tensor | None = None
        for name, rows in routing.groups(x.shape[0], x.device).items():
            weight = self.effective_weight([name]) if self.has_adapter(name) else self.base_layer.weight
            part = self.with_weight(x.index_select(0, rows), weight)
            if result is None:
                result = part.new_empty((x.shape[0], *part.shape[1:]))
            result.index_copy_(0, rows, part)
        assert result is not None
        return result

    # ---- the multiplicative merge -----------------------------------------------------------
    def merge_into_base(self, adapter_name: str, safe_merge: bool = False) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            new = self.folded(weight.to(self.rotation_dtype()), adapter_name, dropout=False)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(
                    f"NaNs or infs detected while merging adapter {adapter_name!r} into {type(self).__name__}; "
                    "the adapter is broken and the base weights were left untouched."
                )
            weight.copy_(new.to(weight.dtype))

    def unmerge_from_base(self, adapter_name: str) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            inverse = torch.linalg.inv(self.blocks(adapter_name, dropout=False).double()).transpose(-1, -2)
            unscaled = self._out_scaled(weight.double(), 1 / self.scale(adapter_name).double())
            restored = apply_butterfly(unscaled.flatten(1), inverse).reshape(weight.shape)
            weight.copy_(restored.to(weight.dtype))


class Linear(BOFTLayer):
    """BOFT for ``nn.Linear``: the input is rotated, the base layer runs, its outputs are scaled."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer, base_layer.in_features, base_layer.out_features)

    def scale_shape(self) -> tuple[int, int]:
        return (self.out_features, 1)

    def _scaled(self, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``(y - bias) * scale + bias``: the base's linear part scaled, its bias not (HF's)."""
        bias = self.base_layer.bias
        scale = scale.to(y.dtype)
        return y * scale if bias is None else (y - bias) * scale + bias

    def folds(self, x: torch.Tensor, weights: int) -> bool:
        """Whether folding the rotation into ``weights`` weights (``out_features`` rows each) costs
        less than rotating ``x``'s rows (both cost ``rows * d * b * m``); only for a plain Linear base,
        whose operation :meth:`with_weight` reproduces."""
        return isinstance(self.base_layer, nn.Linear) and x.numel() // self.in_features > weights * self.out_features

    def with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight.to(x.dtype), self.base_layer.bias)

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.folds(x, 1):
            return self.with_weight(x, self.effective_weight(adapters))
        y = self.base_layer(self.rotate(x, adapters), *args, **kwargs)
        scale = self.scale(adapters[0])
        for name in adapters[1:]:
            scale = scale * self.scale(name)
        return self._scaled(y, scale)

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.adapter_names():
            return self.base_layer(x, *args, **kwargs)
        if self.folds(x, len(routing.groups(x.shape[0], x.device))):
            return self.grouped_forward(x, routing)
        y = self.base_layer(self.rotate_rows(x, routing), *args, **kwargs)
        return self._scaled(y, _rows(self.row_scales(x.shape[0], routing, x.device), y))

class Conv2d(BOFTLayer):
    """BOFT for ``nn.Conv2d``: the rotation acts on the ``in_channels / groups * kh * kw`` kernel
    features, folded into the kernel (and scaled per output channel) for each forward."""

    features_text = "kernel features: in_channels / groups * kh * kw"
    stack_refusal = (
        "BOFT on a Conv2d rotates the plain conv's kernel and runs that convolution itself, so it cannot sit on "
        "top of another method's adapter layer (the adapters below would be skipped); in a mixed model add the "
        "BOFT adapter for Conv2d modules first (other methods may stack on top of it), or leave those modules out"
    )
    """Read by mixed models: why this layer cannot be stacked over other adapter layers."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer, base_layer.weight[0].numel(), base_layer.out_channels)

    def scale_shape(self) -> tuple[int, int]:
        return (1, self.out_features)

    def with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, weight, self.base_layer.bias)

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.with_weight(x, self.effective_weight(adapters))

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.grouped_forward(x, routing)

def make_layer(config: BOFTConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> BOFTLayer | None:
    """The BOFT layer for ``base_layer``'s type with ``adapter_name`` added, or None if unsupported."""
    if isinstance(base_layer, nn.Linear):
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.", UserWarning, stacklevel=2)
        layer: BOFTLayer = Linear(base_layer)
    elif isinstance(base_layer, nn.Conv2d):
        layer = Conv2d(base_layer)
    else:
        return None
    layer.update_layer(adapter_name, config, module_name)
    return layer
