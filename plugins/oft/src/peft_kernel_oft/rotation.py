"""The rotation parameters of one OFT adapter (HF PEFT's ``OFTRotationModule``).

``OFTRotationModule.weight`` ([r, b(b-1)/2], or [1, ...] with ``block_share``) holds the strict
upper triangle, row by row, of one skew-symmetric ``b x b`` matrix ``Q`` per block; the rotation
blocks are its Cayley transforms (:mod:`peft_kernel_orthogonal.rotation`, exact or Neumann series
as HF PEFT 0.21.2). COFT keeps each block's parameters inside a ball of radius
``eps / sqrt(2 * rows)``, projecting the stored parameter in place as HF PEFT does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peft_kernel_orthogonal.rotation import apply_blocks, cayley, skew_from_upper


class OFTRotationModule(nn.Module):
    """One adapter's rotation parameters for one layer (HF PEFT's module of the same name)."""

    def __init__(
        self,
        r: int,
        block_size: int,
        *,
        block_share: bool = False,
        coft: bool = False,
        eps: float = 6e-5,
        use_cayley_neumann: bool = True,
        num_cayley_neumann_terms: int = 5,
        dropout: float = 0.0,
        init_weights: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.r, self.block_size, self.block_share = r, block_size, block_share
        self.coft, self.eps = coft, eps
        self.use_cayley_neumann, self.num_cayley_neumann_terms = use_cayley_neumann, num_cayley_neumann_terms
        self.dropout = dropout
        rows, n_elements = (1 if block_share else r), block_size * (block_size - 1) // 2
        weight = torch.zeros(rows, n_elements, device=device, dtype=dtype)
        if not init_weights:
            nn.init.normal_(weight, mean=0.0, std=0.1)
        self.weight = nn.Parameter(weight)

    @property
    def in_features(self) -> int:
        return self.r * self.block_size

    def extra_repr(self) -> str:
        return f"r={self.r}, block_size={self.block_size}, block_share={self.block_share}, coft={self.coft}"

    def _project(self) -> None:
        """COFT: pull each row of ``weight`` back into the ball of radius ``eps / sqrt(2 * rows)``."""
        with torch.no_grad():
            radius = self.eps / math.sqrt(2 * self.weight.shape[0])
            norms = self.weight.norm(dim=1, keepdim=True)
            if bool((norms > radius).any()):
                factor = torch.where(norms > radius, radius / norms.clamp_min(1e-30), torch.ones_like(norms))
                self.weight.mul_(factor)

    def skew(self) -> torch.Tensor:
        """``Q`` per stored row: ``[rows, b, b]``, upper triangle from ``weight``, lower = -upper."""
        return skew_from_upper(self.weight, self.block_size)

    def blocks(self, dropout: bool = True) -> torch.Tensor:
        """The rotation blocks ``[r, b, b]`` (in training, ``module_dropout`` swaps random blocks
        for the identity unless ``dropout=False``, as merging asks)."""
        if self.coft:
            self._project()
        rotation = cayley(self.skew(), self.use_cayley_neumann, self.num_cayley_neumann_terms)
        if self.block_share:
            rotation = rotation.expand(self.r, -1, -1)
        if dropout and self.training and self.dropout > 0:
            keep = torch.rand(self.r, 1, 1, device=rotation.device) >= self.dropout
            eye = torch.eye(self.block_size, device=rotation.device, dtype=rotation.dtype)
            rotation = torch.where(keep, rotation, eye)
        return rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[..., r * b]`` rotated block by block."""
        return apply_blocks(x.to(self.weight.dtype), self.blocks()).to(x.dtype)
