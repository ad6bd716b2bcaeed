"""``RotationLayer``: the layer base of the orthogonal methods (OFT now; BOFT, HRA next).

An orthogonal adapter does not add to the output: it multiplies the base weight by a rotation
``R`` given as blocks ``[r, b, b]`` acting on consecutive ``b``-wide slices of the features. A
method implements :meth:`RotationLayer.blocks` (its parameterisation), :meth:`block_size` and
:meth:`RotationLayer.fold` (how one adapter's blocks fold into the weight, e.g. ``W R^T`` for a
Linear); this base gives it:

* feature rotation for plain forwards (:meth:`rotate`) and mixed batches (:meth:`rotate_rows`:
  one block product per adapter group), with each adapter's blocks computed once and reused
  across forwards outside training (:meth:`current_blocks`);
* the multiplicative merge ``W <- fold(W, R)`` for each adapter, in the order that makes merged
  equal unmerged (last-first for right-multiplied weights, :attr:`merge_reversed`), and its exact
  inverse on unmerge: the blocks' true inverse, computed in float64 (a Neumann-series rotation is
  only nearly orthogonal, so ``R^T`` would not restore the base).
"""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, Fold, Routing
from peft_kernel_lowrank.adapter_cache import AdapterCache
from peft_kernel_orthogonal.rotation import apply_blocks


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
    def current_blocks(self, adapter_name: str) -> torch.Tensor:
        """:meth:`blocks` for a forward; outside training (no module dropout) computed once and
        reused while the adapter is unchanged (in-place writes, new tensors, moves rebuild them)."""
        if self.training:
            return self.blocks(adapter_name)
        cache = self.__dict__.setdefault("_rotation_cache", AdapterCache())
        return cache.get(self, adapter_name, lambda: self.blocks(adapter_name))

    def rotate(self, t: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """``t[..., in_features]`` rotated by each adapter in turn."""
        h = t.to(self.rotation_dtype())
        for name in adapters:
            blocks = self.current_blocks(name)
            h = apply_blocks(h.to(blocks.dtype), blocks)
        return h.to(t.dtype)

    def rotate_rows(self, t: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``t[B, ..., in_features]`` with each row rotated by its own adapter (identity for
        ``"__base__"`` rows and adapters this layer does not hold): each adapter's rows in one
        block product with its (cached) blocks, written back in place."""
        h = t.to(self.rotation_dtype())
        out = None
        for name, rows in routing.groups(t.shape[0], t.device).items():
            if self.has_adapter(name):
                out = h.clone() if out is None else out
                blocks = self.current_blocks(name)
                out.index_copy_(0, rows, apply_blocks(h.index_select(0, rows), blocks.to(h.dtype)))
        return t if out is None else out.to(t.dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if "_rotation_cache" in self.__dict__:
            self.__dict__["_rotation_cache"].drop(adapter_name)

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
