"""The ScaleShift adapter layer: ``y = (1 + ss_scale) * base(x) + ss_shift`` for ``nn.Linear``.

What the core derives from what this class provides:

* parameters live in the ``nn.ParameterDict`` containers named in ``adapter_layer_names``, so the
  in-memory key ``lin.ss_scale.default`` is saved as ``lin.ss_scale`` (HF PEFT's key format) and
  add / delete / set_adapter / trainability need no code here;
* ``delta(x, adapter)`` (the additive protocol) is what the core's generic ``mixed_forward`` adds to
  each row group of a mixed batch, so mixed batches need no code here either;
* the forward with active adapters and merging are overridden: stacked adapters compose one after
  the other (an affine map of an affine map), and a merge is an affine rewrite of weight and bias,
  not an addition of ``delta_weight``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_kernel.layer import AdapterLayer


class ScaleShiftLinear(AdapterLayer):
    """ScaleShift on an ``nn.Linear``: one scale and one shift per output feature and adapter."""

    adapter_layer_names = ("ss_scale", "ss_shift")

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.ss_scale = nn.ParameterDict()
        self.ss_shift = nn.ParameterDict()
        self._bias_added_by_merge = False

    # ---- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: Any, module_name: str = "") -> None:
        weight = self.base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        shape = (self.base_layer.out_features,)
        if config.init_scaleshift_weights:
            scale, shift = torch.zeros(shape), torch.zeros(shape)
        else:
            scale, shift = torch.randn(shape) * 0.1, torch.randn(shape) * 0.1
        self.ss_scale[adapter_name] = nn.Parameter(scale.to(weight.device, dtype))
        self.ss_shift[adapter_name] = nn.Parameter(shift.to(weight.device, dtype))

    # ---- forward ----------------------------------------------------------------------------
    def _affine(self, y: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return y * (1 + self.ss_scale[adapter_name].to(y.dtype)) + self.ss_shift[adapter_name].to(y.dtype)

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """What one adapter adds to ``base_layer(x)``: ``scale * base(x) + shift``."""
        y = self.base_layer(x)
        return y * self.ss_scale[adapter_name].to(y.dtype) + self.ss_shift[adapter_name].to(y.dtype)

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """One base call, then each active adapter's affine map in order."""
        result = self.base_layer(x, *args, **kwargs)
        for name in adapters:
            result = self._affine(result, name)
        return result

    # ---- merge ------------------------------------------------------------------------------
    def merge_into_base(self, adapter_name: str, safe_merge: bool = False) -> None:
        """``W' = (1 + s) W`` and ``b' = (1 + s) b + t``; a bias-free Linear gains a bias."""
        base = self.base_layer
        scale = 1 + self.ss_scale[adapter_name].detach().to(base.weight.dtype)
        shift = self.ss_shift[adapter_name].detach().to(base.weight.dtype)
        bias = base.bias.detach() if base.bias is not None else torch.zeros_like(shift)
        new_weight, new_bias = base.weight.detach() * scale[:, None], bias * scale + shift
        if safe_merge and not (torch.isfinite(new_weight).all() and torch.isfinite(new_bias).all()):
            raise ValueError(
                f"NaNs or infs detected while merging ScaleShift adapter {adapter_name!r} into "
                f"{type(self).__name__}; the base weights were left untouched."
            )
        with torch.no_grad():
            base.weight.copy_(new_weight)
            if base.bias is None:
                base.bias = nn.Parameter(new_bias, requires_grad=False)
                self._bias_added_by_merge = True
            else:
                base.bias.copy_(new_bias)

    def unmerge_from_base(self, adapter_name: str) -> None:
        """The inverse affine map; drops the bias a merge added once nothing is merged any more.

        The core pops ``adapter_name`` from ``merged_adapters`` before calling this, last merged first.
        """
        base = self.base_layer
        scale = 1 + self.ss_scale[adapter_name].detach().to(base.weight.dtype)
        shift = self.ss_shift[adapter_name].detach().to(base.weight.dtype)
        with torch.no_grad():
            base.weight.copy_(base.weight / scale[:, None])
            base.bias.copy_((base.bias - shift) / scale)
        if self._bias_added_by_merge and not self.merged_adapters:
            base.bias = None
            self._bias_added_by_merge = False
