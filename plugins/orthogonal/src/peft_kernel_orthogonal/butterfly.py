"""Butterfly-factored rotations (BOFT): ``m`` block-diagonal factors, each behind its own butterfly
permutation, multiplied into one dense-connectivity rotation of ``d = D * b`` features.

Blocks are stored as ``[m, D, b, b]`` (factor, block, rows, cols). Factor ``i`` cuts the features
into segments of ``b * 2**i``; each segment is two halves of ``2**i`` chunks of ``b / 2`` features,
and block ``k`` of a segment rotates chunk ``k`` of the first half together with chunk ``k`` of the
second (factor 0: plain consecutive blocks). As a feature map (row vectors), the rotation is

    x  ->  x R,   R = G_{m-1} ... G_1 G_0,   G_i = P_i^T diag(B_i) P_i

so factor ``m - 1`` acts first -- HF PEFT 0.21.2's composition. The permutations are reshapes and
transposes, never index gathers, and the dense ``R`` is never built: applying a factor to ``n``
rows costs ``n * d * b``. Dense matrices (:func:`butterfly_matrix`) exist for tests and checks only.
"""

from __future__ import annotations

import torch

from peft_kernel_orthogonal.rotation import apply_blocks, apply_row_blocks


def butterfly_problem(features: int, block_size: int, factors: int) -> str | None:
    """Why ``factors`` butterfly factors of ``block_size`` blocks cannot rotate ``features``, or
    None when they can (the blocks tile the features; with several factors ``b`` is even, so
    blocks split into half-block chunks, and the block count is a multiple of ``2**(factors - 1)``,
    so the widest factor's segments tile the features)."""
    if block_size < 1 or features % block_size:
        return f"the block size ({block_size}) must divide the features ({features})"
    if factors > 1 and block_size % 2:
        return f"the block size ({block_size}) must be even with more than one butterfly factor"
    blocks, span = features // block_size, 2 ** (factors - 1)
    if factors > 1 and blocks % span:
        return (f"the block count ({blocks} = {features} / {block_size}) must be a multiple of 2**(factors - 1) = "
                f"{span} for {factors} butterfly factors")
    return None


def _segments(shape: torch.Size, block_size: int, factor: int) -> tuple[int, ...]:
    """``x.shape`` with the feature axis split as ``[segments, 2, 2**factor, b / 2]``."""
    half = block_size // 2
    return (*shape[:-1], shape[-1] // (block_size << factor), 2, 1 << factor, half)


def _apply_factor(x: torch.Tensor, blocks: torch.Tensor, factor: int, rows: bool) -> torch.Tensor:
    """``x G_factor`` for ``blocks`` ``[D, b, b]`` (``[B, D, b, b]`` with ``rows``: per batch row)."""
    if factor == 0:
        return apply_row_blocks(x, blocks) if rows else apply_blocks(x, blocks)
    shape = x.shape
    grouped = x.reshape(_segments(shape, blocks.shape[-1], factor)).transpose(-3, -2)  # blocks contiguous
    permuted_shape = grouped.shape
    flat = grouped.reshape(*shape[:-1], shape[-1])
    out = apply_row_blocks(flat, blocks) if rows else apply_blocks(flat, blocks)
    return out.reshape(permuted_shape).transpose(-3, -2).reshape(shape)


def apply_butterfly(x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x R`` for the rotation of ``blocks`` ``[m, D, b, b]`` acting on ``x[..., D * b]``;
    ``transpose=True`` gives ``x R^T`` (factor 0 first, each block transposed): the weight-side
    form, ``W R^T`` being the weight whose layer computes ``base(x R)``."""
    factors = range(blocks.shape[0]) if transpose else reversed(range(blocks.shape[0]))
    for i in factors:
        x = _apply_factor(x, blocks[i].transpose(-1, -2) if transpose else blocks[i], i, rows=False)
    return x


def apply_row_butterfly(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """:func:`apply_butterfly` with one rotation per batch row: ``x[B, ..., D * b]``, ``blocks``
    ``[B, m, D, b, b]``."""
    for i in reversed(range(blocks.shape[1])):
        x = _apply_factor(x, blocks[:, i], i, rows=True)
    return x


def butterfly_matrix(blocks: torch.Tensor) -> torch.Tensor:
    """The dense ``d x d`` rotation ``R`` of ``blocks`` (for checks; forwards never build it)."""
    m, num, b, _ = blocks.shape
    return apply_butterfly(torch.eye(num * b, dtype=blocks.dtype, device=blocks.device), blocks)


def butterfly_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Multiplicative dropout (HF PEFT's BOFT dropout): in one butterfly factor drawn at random,
    ``int(p * D)`` blocks drawn at random become the identity; the other factors are untouched."""
    m, num, b, _ = blocks.shape
    dropped = int(p * num)
    if dropped == 0:
        return blocks
    mask = torch.zeros(m, num, 1, 1, dtype=torch.bool, device=blocks.device)
    factor = int(torch.randint(0, m, (1,)))
    mask[factor, torch.randperm(num, device=blocks.device)[:dropped]] = True
    eye = torch.eye(b, dtype=blocks.dtype, device=blocks.device)
    return torch.where(mask, eye, blocks)
