"""Block-diagonal rotations shared by the orthogonal methods (OFT now; BOFT, HRA next).

A skew-symmetric ``b x b`` matrix ``Q`` per block is stored as its strict upper triangle, row by
row (:func:`skew_from_upper`). Each block's rotation is the Cayley transform
``R = (I + Q)^-1 (I - Q)``, or with ``use_neumann`` a truncated power series in ``Q`` (cheaper, no
inverse). The series approximates ``(I + Q)(I - Q)^-1`` -- the Cayley transform of ``-Q``, i.e.
``R^T`` -- and its terms are exactly those HF PEFT 0.21.2 uses, so outputs agree with HF in both
modes.

A tensor ``M[..., r * b]`` is rotated block by block: ``M_i @ R_i`` for every block ``i``
(:func:`apply_blocks`; :func:`apply_row_blocks` with one set of blocks per batch row).
"""

from __future__ import annotations

import warnings

import torch


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


def skew_from_upper(upper: torch.Tensor, block_size: int) -> torch.Tensor:
    """``Q`` per row of ``upper`` (``[n, b(b-1)/2]``, each row a strict upper triangle, row by row):
    ``[n, b, b]`` with the lower triangle the negated upper one."""
    b = block_size
    rows, cols = torch.triu_indices(b, b, offset=1, device=upper.device)
    q = upper.new_zeros(upper.shape[0], b, b)
    q[:, rows, cols] = upper
    return q - q.transpose(1, 2)
