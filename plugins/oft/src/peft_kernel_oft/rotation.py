"""The block-diagonal rotation of one OFT adapter.

``OFTRotationModule.weight`` ([r, b(b-1)/2], or [1, ...] with ``block_share``) holds the strict
upper triangle, row by row, of one skew-symmetric ``b x b`` matrix ``Q`` per block. Each block's
rotation is the Cayley transform ``R = (I + Q)^-1 (I - Q)``, or with ``use_cayley_neumann`` a
truncated power series in ``Q`` (cheaper, no inverse). The series approximates
``(I + Q)(I - Q)^-1`` -- the Cayley transform of ``-Q``, i.e. ``R^T`` -- and its terms are exactly
those HF PEFT 0.21.2 uses, so outputs agree with HF in both modes. COFT keeps each block's parameters inside a ball of radius
``eps / sqrt(2 * rows)``, projecting the stored parameter in place as HF PEFT does.

A tensor ``M[..., r * b]`` is rotated block by block: ``M_i @ R_i`` for every block ``i``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn


def nearest_divisor(n: int, target: int) -> int:
    """The divisor of ``n`` closest to ``target`` (the smaller one on a tie)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d))


def block_layout(in_features: int, r: int, block_size: int) -> tuple[int, int]:
    """``(r, oft_block_size)`` for a layer of ``in_features``; exactly one of ``r`` and
    ``block_size`` is given (non-zero). A value that does not divide ``in_features`` moves to the
    nearest divisor with a warning (HF PEFT's behaviour, so HF-saved adapters keep their shapes)."""
    if (r == 0) == (block_size == 0):
        raise ValueError(
            f"You can only specify either r ({r}) or oft_block_size ({block_size}), but not both simultaneously "
            "(and not neither), because r x oft_block_size == in_features."
        )
    if r == 0:
        if in_features % block_size:
            old, block_size = block_size, nearest_divisor(in_features, block_size)
            warnings.warn(f"Invalid `oft_block_size` ({old})! Adjusted `oft_block_size` to ({block_size}).", UserWarning,
                          stacklevel=3)
        return in_features // block_size, block_size
    if in_features % r:
        old, r = r, nearest_divisor(in_features, r)
        warnings.warn(f"Invalid `r` ({old})! Adjusted `r` to ({r}).", UserWarning, stacklevel=3)
    return r, in_features // r


def cayley(q: torch.Tensor, use_neumann: bool, terms: int) -> torch.Tensor:
    """Rotation blocks ``[n, b, b]`` from skew-symmetric ``q`` ``[n, b, b]``."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if not use_neumann:
        return torch.linalg.solve(eye + q, eye - q)
    if terms <= 1:
        return eye.clone()
    if terms == 2:
        return eye + 2 * q
    top = max(2, terms - 2)  # I + 2(Q + ... + Q^top) + Q^(top + 1)
    power, acc = q, q
    for _ in range(top - 1):
        power = power @ q
        acc = acc + power
    return eye + 2 * acc + power @ q


def apply_blocks(m: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``M_i @ B_i`` for each block ``i`` of the last axis of ``m`` (``blocks``: [r, b, b])."""
    r, b, _ = blocks.shape
    shape = m.shape
    out = torch.einsum("...rk,rkj->...rj", m.reshape(*shape[:-1], r, b), blocks)
    return out.reshape(shape)


def apply_row_blocks(m: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Like :func:`apply_blocks` with one set of blocks per batch row (``blocks``: [B, r, b, b])."""
    batch, r, b, _ = blocks.shape
    shape = m.shape
    out = torch.einsum("btrk,brkj->btrj", m.reshape(batch, -1, r, b), blocks)
    return out.reshape(shape)


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
        b = self.block_size
        rows, cols = torch.triu_indices(b, b, offset=1, device=self.weight.device)
        q = self.weight.new_zeros(self.weight.shape[0], b, b)
        q[:, rows, cols] = self.weight
        return q - q.transpose(1, 2)

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
