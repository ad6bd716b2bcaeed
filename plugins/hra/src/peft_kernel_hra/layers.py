"""HRA adapter layers: ``nn.Linear`` and ``nn.Conv2d`` with ``groups=1`` (HF PEFT's layer types).

An HRA adapter multiplies the base weight by ``H``, a product of Householder reflections in the
columns of ``hra_u`` (``[in_features, r]``; a Conv2d's features are its flattened
``in_channels * kh * kw`` patches): ``W' = W H_1 H_2 ... H_r``, or with ``apply_GS``
``W' = W (I - 2 Q Q^T)`` for the Gram-Schmidt orthonormalised columns ``Q``. ``H`` is never built:
it is kept in compact WY form (:mod:`peft_kernel_orthogonal.householder`), ``2 d r`` per row.

* Linear: ``y = base(x H^T)`` -- the input is reflected, ``r`` vectors deep, and the base layer
  runs as it is (so HRA stacks on other adapter layers in a mixed model).
* Conv2d: the kernel is reflected, ``W.flatten(1) H``, and convolved.

Several active adapters compose as in HF PEFT, ``W H_a H_b``; merging folds them in that order and
unmerging applies the inverse ``H^T`` (the reflections reversed), last merged first. Mixed batches
give each row its own adapter in one pass: the adapters' WY factors are zero-padded to one rank and
gathered per row (Linear), or the per-row kernels run as one grouped convolution (Conv2d).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, Routing
from peft_kernel_hra.config import HRAConfig
from peft_kernel_orthogonal.householder import compact_wy, gram_schmidt, reflect, unit_columns
from peft_kernel_orthogonal.layer import adapter_dtype


class HRALayer(AdapterLayer):
    """State shared by the HRA layer types: the vectors ``hra_u`` and their WY factors."""

    adapter_layer_names = ("hra_u",)
    other_param_names = ("hra_r", "hra_apply_GS")
    status_type_names = {"Linear": "HRALinear", "Conv2d": "HRAConv2d"}

    def __init__(self, base_layer: nn.Module, features: int) -> None:
        super().__init__(base_layer)
        self.features = features  # the width d the reflections act on
        self.hra_u = nn.ParameterDict()
        self.hra_r: dict[str, int] = {}
        self.hra_apply_GS: dict[str, bool] = {}

    def update_layer(self, adapter_name: str, config: HRAConfig, module_name: str = "") -> None:
        r = config.r
        weight = self.base_layer.weight
        u = torch.empty(self.features, r, device=weight.device, dtype=adapter_dtype(self.base_layer))
        if config.init_weights and r % 2 == 0:  # each vector twice: the reflections cancel in pairs
            half = torch.empty(self.features, r // 2, device=u.device, dtype=u.dtype)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = half.repeat_interleave(2, dim=1)
            if config.apply_GS:
                warnings.warn(
                    f"{module_name or type(self).__name__}: HRA's symmetric initialisation repeats each vector and "
                    "Gram-Schmidt (apply_GS=True) drops the repeats, so the adapter does not start as the identity "
                    "(HF PEFT 0.21.2 normalises their rounding-size residuals: NaN, or a matrix that is not orthogonal).",
                    UserWarning, stacklevel=2)
        else:
            if config.init_weights:
                warnings.warn("The symmetric initialization can NOT be performed when r is odd!", UserWarning,
                              stacklevel=2)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.hra_u[adapter_name] = nn.Parameter(u)
        self.hra_r[adapter_name] = r
        self.hra_apply_GS[adapter_name] = config.apply_GS

    def compute_dtype(self) -> torch.dtype:
        """The dtype reflections are computed in: the adapters' (float32 for a half-precision base
        unless ``autocast_adapter_dtype=False``), at least float32."""
        for u in self.hra_u.values():
            return torch.promote_types(u.dtype, torch.float32)
        return torch.float32

    def reflector(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Y [d, r], T [r, r])`` with ``H = I - Y T Y^T`` for ``adapter_name``."""
        u = self.hra_u[adapter_name].to(self.compute_dtype())
        y = gram_schmidt(u) if self.hra_apply_GS[adapter_name] else unit_columns(u)
        return y, compact_wy(y)

    # ---- the multiplicative merge -----------------------------------------------------------
    def _fold(self, weight: torch.Tensor, adapter_name: str, inverse: bool) -> torch.Tensor:
        """``weight`` (in ``[out, d]`` layout) times ``H`` (or ``H^T = H^-1`` with ``inverse``)."""
        y, t = self.reflector(adapter_name)
        return reflect(weight.to(y.dtype), y, t, transpose=inverse)

    def _write(self, adapter_name: str, inverse: bool, safe_merge: bool) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            new = self._fold(weight.flatten(1), adapter_name, inverse).reshape(weight.shape).to(weight.dtype)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(
                    f"NaNs or infs detected while merging adapter {adapter_name!r} into {type(self).__name__}; "
                    "the adapter is broken and the base weights were left untouched."
                )
            weight.copy_(new)

    def merge_into_base(self, adapter_name: str, safe_merge: bool = False) -> None:
        self._write(adapter_name, inverse=False, safe_merge=safe_merge)

    def unmerge_from_base(self, adapter_name: str) -> None:
        self._write(adapter_name, inverse=True, safe_merge=False)


class Linear(HRALayer):
    """HRA for ``nn.Linear``: the input is reflected before the base layer."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer, base_layer.in_features)

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        h = x.to(self.compute_dtype())
        for name in reversed(adapters):  # x (H_a H_b)^T = x H_b^T H_a^T
            h = reflect(h, *self.reflector(name), transpose=True)
        return self.base_layer(h.to(x.dtype), *args, **kwargs)

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        order = tuple(self.adapter_names())
        if not order:
            return self.base_layer(x, *args, **kwargs)
        factors = [self.reflector(name) for name in order]
        rank = max(y.shape[-1] for y, _ in factors)
        ys = torch.stack([F.pad(y, (0, rank - y.shape[-1])) for y, _ in factors])
        ts = torch.stack([F.pad(t, (0, rank - t.shape[-1], 0, rank - t.shape[-1])) for _, t in factors])
        ys, ts = F.pad(ys, (0, 0, 0, 0, 0, 1)), F.pad(ts, (0, 0, 0, 0, 0, 1))  # last slot: zeros, the identity
        slots = routing.slots(x.shape[0], x.device, order) % ys.shape[0]
        h = reflect(x.to(ys.dtype), ys.index_select(0, slots), ts.index_select(0, slots), transpose=True)
        return self.base_layer(h.to(x.dtype), *args, **kwargs)


class Conv2d(HRALayer):
    """HRA for ``nn.Conv2d`` (``groups=1``): the kernel's flattened patches are reflected."""

    stack_refusal = (
        "HRA on a Conv2d reflects the plain conv's kernel and runs that convolution itself, so it cannot sit on "
        "top of another method's adapter layer (the adapters below would be skipped); in a mixed model add the "
        "HRA adapter for Conv2d modules first (other methods may stack on top of it), or leave those modules out"
    )
    """Read by mixed models: why this layer cannot be stacked over other adapter layers."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if base_layer.groups != 1:
            raise NotImplementedError(f"HRA does not support Conv2d layers with groups > 1 (got groups={base_layer.groups}).")
        kh, kw = base_layer.kernel_size
        super().__init__(base_layer, base_layer.in_channels * kh * kw)

    def effective_weight(self, adapters: list[str]) -> torch.Tensor:
        """The kernel ``W H_a H_b ...`` of the given adapters, in the base weight's dtype."""
        weight = self.base_layer.weight
        w = weight.flatten(1)
        for name in adapters:
            w = self._fold(w, name, inverse=False)
        return w.reshape(weight.shape).to(weight.dtype)

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_layer._conv_forward(x, self.effective_weight(adapters), self.base_layer.bias)

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One grouped convolution: row ``b`` is group ``b``, convolved with its own adapter's kernel."""
        order = tuple(self.adapter_names())
        conv = self.base_layer
        kernels = torch.stack([*(self.effective_weight([name]) for name in order), conv.weight])
        slots = routing.slots(x.shape[0], x.device, order) % kernels.shape[0]
        rows = kernels.index_select(0, slots)  # [B, out, in, kh, kw]
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        batch = x.shape[0]
        out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), rows.flatten(0, 1), None, conv.stride, padding, conv.dilation,
                       groups=batch)
        out = out.reshape(batch, conv.out_channels, *out.shape[2:])
        return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)


def make_layer(config: HRAConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> HRALayer | None:
    """The HRA layer for ``base_layer``'s type with ``adapter_name`` added, or None if unsupported."""
    if isinstance(base_layer, nn.Linear):
        layer: HRALayer = Linear(base_layer)
    elif isinstance(base_layer, nn.Conv2d):
        layer = Conv2d(base_layer)
    else:
        return None
    layer.update_layer(adapter_name, config, module_name)
    return layer
