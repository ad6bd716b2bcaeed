"""``RotationLayer``: the layer base of the orthogonal methods (OFT now; BOFT, HRA next).

An orthogonal adapter does not add to the output: it multiplies the base weight by a rotation
``R`` given as blocks ``[r, b, b]`` acting on consecutive ``b``-wide slices of the features. A
method implements :meth:`RotationLayer.blocks` (its parameterisation), :meth:`block_size` and
:meth:`RotationLayer.fold` (how one adapter's blocks fold into the weight, e.g. ``W R^T`` for a
Linear); this base gives it:

* feature rotation for plain forwards (:meth:`rotate`) and mixed batches (:meth:`rotate_rows`:
  one gather of per-row blocks when the layer's adapters share a block size, otherwise one
  rotation per adapter group);
* the multiplicative merge ``W <- fold(W, R)`` for each adapter, in the order that makes merged
  equal unmerged (last-first for right-multiplied weights, :attr:`merge_reversed`), and its exact
  inverse on unmerge: the blocks' true inverse, computed in float64 (a Neumann-series rotation is
  only nearly orthogonal, so ``R^T`` would not restore the base).
"""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, Fold, Routing
from peft_kernel_orthogonal.rotation import apply_blocks, apply_row_blocks


def adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """Adapters live in float32 when the base is half precision (HF's autocast_adapter_dtype)."""
    dtype = base_layer.weight.dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class RotationLayer(AdapterLayer):
    """An adapter layer whose adapters rotate features block by block (see the module docstring)."""

    merge_reversed = True
    """Whether adapters fold into the weight last-first (right-multiplied weights: Linear, Conv)."""

    # ---- what a method implements ---------------------------------------------------------
    def blocks(self, adapter_name: str, dropout: bool = True) -> torch.Tensor:
        """``adapter_name``'s rotation blocks ``[r, b, b]``; ``dropout=False`` when merging (no
        training-time module dropout)."""
        raise NotImplementedError

    def block_size(self, adapter_name: str) -> int:
        """``b``: the width of the feature slices ``adapter_name`` rotates."""
        raise NotImplementedError

    def fold(self, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The base weight with one adapter's ``blocks`` folded in."""
        raise NotImplementedError

    def rotation_dtype(self) -> torch.dtype:
        """The dtype rotations are computed in: the adapters' own (float32, or the base's with
        ``autocast_adapter_dtype=False``)."""
        for name in self.adapter_names():
            for param in self.adapter_parameters(name):
                return param.dtype
        return adapter_dtype(self.base_layer)

    # ---- rotating features ------------------------------------------------------------------
    def rotate(self, t: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """``t[..., in_features]`` rotated by each adapter in turn."""
        h = t.to(self.rotation_dtype())
        for name in adapters:
            blocks = self.blocks(name)
            h = apply_blocks(h.to(blocks.dtype), blocks)
        return h.to(t.dtype)

    def rotate_rows(self, t: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``t[B, ..., in_features]`` with each row rotated by its own adapter (identity for
        ``"__base__"`` rows and adapters this layer does not hold)."""
        order = tuple(self.adapter_names())
        if not order:
            return t
        h = t.to(self.rotation_dtype())
        if len({self.block_size(a) for a in order}) == 1:
            stacked = torch.stack([self.blocks(a).to(h.dtype) for a in order])  # [n, r, b, b]
            eye = torch.eye(stacked.shape[-1], device=stacked.device, dtype=stacked.dtype)
            stacked = torch.cat([stacked, eye.expand_as(stacked[:1])])
            slots = routing.slots(t.shape[0], t.device, order) % stacked.shape[0]
            return apply_row_blocks(h, stacked.index_select(0, slots)).to(t.dtype)
        out = h.clone()
        for name, rows in routing.groups(t.shape[0], t.device).items():
            if name in order:
                out.index_copy_(0, rows, apply_blocks(h.index_select(0, rows), self.blocks(name)))
        return out.to(t.dtype)

    # ---- the multiplicative merge -----------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None, fold: Fold | None = None) -> None:
        names = list(self._active_adapters if adapter_names is None else adapter_names)
        super().merge(safe_merge=safe_merge, adapter_names=names[::-1] if self.merge_reversed else names, fold=fold)

    def _write(self, adapter_name: str, blocks: torch.Tensor, safe_merge: bool) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            new = self.fold(weight.to(blocks.dtype), blocks).to(weight.dtype)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(
                    f"NaNs or infs detected while merging adapter {adapter_name!r} into {type(self).__name__}; "
                    "the adapter is broken and the base weights were left untouched."
                )
            weight.copy_(new)

    def merge_into_base(self, adapter_name: str, safe_merge: bool = False) -> None:
        with torch.no_grad():
            blocks = self.blocks(adapter_name, dropout=False).detach()
        self._write(adapter_name, blocks, safe_merge)

    def unmerge_from_base(self, adapter_name: str) -> None:
        # the Neumann rotation is only nearly orthogonal: undo it with the true inverse
        with torch.no_grad():
            inverse = torch.linalg.inv(self.blocks(adapter_name, dropout=False).detach().double())
        self._write(adapter_name, inverse.to(self.rotation_dtype()), False)
