"""C3A's block-circulant products in the frequency domain, laid out for batched matrix products.

Every tensor here keeps the frequency axis first and contiguous, so the per-frequency products
``[rows, blocks_in] @ [blocks_in, blocks_out]`` run as one ``bmm`` over frequencies (a product
whose operands stride the frequency axis innermost falls back to a slow per-matrix loop on CPU).
A mixed batch places each adapter's rows in its own equal-width segment of a zero-padded batch
(:class:`Padding`), so one ``bmm`` over (frequency, adapter) serves every adapter at once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

MAX_PADDING = 2
"""The padded batch may hold at most this many times the rows it serves (unbalanced groups beyond
it take the per-group path)."""


def spectrum(kernel: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """``conj(rfft(kernel)) / in_features`` of a ``[blocks_out, blocks_in, size]`` kernel, as a
    contiguous ``[frequencies, blocks_in, blocks_out]`` complex tensor."""
    return (torch.fft.rfft(kernel.to(dtype), dim=-1).conj() / in_features).permute(2, 1, 0).contiguous()


def signal(x: torch.Tensor, size: int) -> torch.Tensor:
    """The real FFT of each ``size`` block of the rows of ``x [rows, in]``, as a contiguous
    ``[frequencies, rows, blocks_in]`` complex tensor."""
    return torch.fft.rfft(x.unflatten(-1, (-1, size)), dim=-1).permute(2, 0, 1).contiguous()


def blocks(product: torch.Tensor, size: int) -> torch.Tensor:
    """The inverse real FFT of ``product [frequencies, rows, blocks_out]``: ``[rows, blocks_out,
    size]``, contiguous (flatten the last two dims for the output features). Transposed first:
    torch's FFTs along a strided axis cost about twice the copy."""
    return torch.fft.irfft(product.permute(1, 2, 0).contiguous(), n=size, dim=-1)


def apply(x: torch.Tensor, spectra: torch.Tensor, size: int) -> torch.Tensor:
    """``x [rows, in]`` times the block-circulant matrix of ``spectra [frequencies, blocks_in,
    blocks_out]`` (from :func:`spectrum`): ``[rows, out]``."""
    return blocks(torch.bmm(signal(x, size), spectra), size).flatten(-2)


class Padding(NamedTuple):
    """Where a mixed batch's rows sit in the zero-padded batch of ``groups * width`` rows, adapter
    ``g``'s rows at ``g * width ...``: ``rows`` (the batch rows with an adapter here, ascending)
    go to ``positions``; ``every_row``: ``rows`` is the whole batch."""

    width: int
    rows: torch.Tensor
    positions: torch.Tensor
    every_row: bool


def padding(groups: list[torch.Tensor], batch: int) -> Padding | None:
    """The :class:`Padding` of row ``groups`` (one index tensor per adapter, in stack order), or
    ``None`` where the padded batch would exceed ``MAX_PADDING`` times the rows it serves."""
    sizes = [len(rows) for rows in groups]
    width, served = max(sizes), sum(sizes)
    if len(groups) * width > MAX_PADDING * served:
        return None
    pairs = sorted((row, g * width + j) for g, rows in enumerate(groups) for j, row in enumerate(rows.tolist()))
    device = groups[0].device
    return Padding(width, torch.tensor([r for r, _ in pairs], device=device),
                   torch.tensor([p for _, p in pairs], device=device), served == batch)


def apply_padded(x: torch.Tensor, stack: torch.Tensor, size: int, pad: Padding) -> torch.Tensor:
    """Each of ``pad.rows`` of ``x [batch, ..., in]`` times its own adapter's block-circulant
    matrix, ``stack [frequencies, adapters, blocks_in, blocks_out]`` holding the adapters' spectra:
    ``[len(pad.rows), ..., out]`` in ``x``'s compute dtype ``stack.real.dtype``."""
    freqs, adapters, blocks_in, blocks_out = stack.shape
    dtype = stack.real.dtype
    picked = x if pad.every_row else x.index_select(0, pad.rows)
    padded = x.new_zeros((adapters * pad.width, *x.shape[1:]), dtype=dtype)
    padded.index_copy_(0, pad.positions, picked.to(dtype))
    spectra = signal(padded.view(-1, x.shape[-1]), size).view(freqs * adapters, -1, blocks_in)
    product = torch.bmm(spectra, stack.view(freqs * adapters, blocks_in, blocks_out)).view(freqs, -1, blocks_out)
    out = blocks(product, size).unflatten(0, padded.shape[:-1])  # [adapters * width, ..., blocks_out, size]
    return out.index_select(0, pad.positions).flatten(-2)
