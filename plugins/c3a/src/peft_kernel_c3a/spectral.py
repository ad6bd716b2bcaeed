"""C3A's block-circulant products in the frequency domain, laid out for batched matrix products.

Every tensor here keeps the frequency axis first and contiguous, so the per-frequency products
``[rows, blocks_in] @ [blocks_in, blocks_out]`` run as one ``bmm`` over frequencies (a product
whose operands stride the frequency axis innermost falls back to a slow per-matrix loop on CPU).
A mixed batch places each adapter's rows in its own equal-width segment of a padded batch
(:class:`Padding`), so one ``bmm`` over (frequency, adapter) serves every adapter at once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

MAX_PADDING = 2
"""The padded batch may hold at most this many times the rows it serves (unbalanced groups beyond
it take the per-group path)."""


def spectrum(kernel: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """``conj(rfft(kernel)) / in_features`` of a ``[..., blocks_out, blocks_in, size]`` kernel (or a
    stack of kernels), as a contiguous ``[frequencies, ..., blocks_in, blocks_out]`` complex tensor."""
    spectra = torch.fft.rfft(kernel.to(dtype), dim=-1).conj() / in_features
    return spectra.movedim(-1, 0).transpose(-1, -2).contiguous()


def signal(x: torch.Tensor, size: int) -> torch.Tensor:
    """The real FFT of each ``size`` block of the rows of ``x [rows, in]``, as a contiguous
    ``[frequencies, rows, blocks_in]`` complex tensor."""
    return torch.fft.rfft(x.unflatten(-1, (-1, size)), dim=-1).permute(2, 0, 1).contiguous()


def blocks(product: torch.Tensor, size: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse real FFT of ``product [frequencies, rows, ..., blocks_out]`` (of its ``rows``
    only, where given): ``[rows, ..., blocks_out * size]``. Moved to frequencies last first, in the
    same copy as the row selection: torch's FFTs along a strided axis cost about twice that copy."""
    product = product.movedim(0, -1)
    product = product.contiguous() if rows is None else product.index_select(0, rows)
    return torch.fft.irfft(product, n=size, dim=-1).flatten(-2)


def apply(x: torch.Tensor, spectra: torch.Tensor, size: int) -> torch.Tensor:
    """``x [rows, in]`` times the block-circulant matrix of ``spectra [frequencies, blocks_in,
    blocks_out]`` (from :func:`spectrum`): ``[rows, out]``."""
    return blocks(torch.bmm(signal(x, size), spectra), size)


class Padding(NamedTuple):
    """A mixed batch laid out as ``adapters`` equal segments of ``width`` rows, adapter ``g``'s rows
    first in segment ``g``: padded row ``p`` reads batch row ``fill[p]`` (the rest of a segment
    repeats a row, whose outputs are never read); ``rows`` (the batch rows with an adapter here,
    ascending) come back from padded rows ``positions``; ``every_row``: ``rows`` is the whole batch."""

    width: int
    fill: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    every_row: bool


def padding(groups: list[torch.Tensor], batch: int) -> Padding | None:
    """The :class:`Padding` of row ``groups`` (one index tensor per adapter, in stack order), or
    ``None`` where the padded batch would exceed ``MAX_PADDING`` times the rows it serves."""
    lists = [rows.tolist() for rows in groups]
    width, served = max(map(len, lists)), sum(map(len, lists))
    if len(lists) * width > MAX_PADDING * served:
        return None
    fill = [rows[min(j, len(rows) - 1)] for rows in lists for j in range(width)]
    pairs = sorted((row, g * width + j) for g, rows in enumerate(lists) for j, row in enumerate(rows))
    device = groups[0].device
    return Padding(width, torch.tensor(fill, device=device), torch.tensor([r for r, _ in pairs], device=device),
                   torch.tensor([p for _, p in pairs], device=device), served == batch)


def apply_padded(x: torch.Tensor, stack: torch.Tensor, size: int, pad: Padding) -> torch.Tensor:
    """Each of ``pad.rows`` of ``x [batch, ..., in]`` times its own adapter's block-circulant
    matrix, ``stack [frequencies, adapters, blocks_in, blocks_out]`` holding the adapters' spectra:
    ``[len(pad.rows), ..., out]`` in the compute dtype ``stack.real.dtype``."""
    freqs, adapters, blocks_in, blocks_out = stack.shape
    padded = x.index_select(0, pad.fill).to(stack.real.dtype)
    spectra = signal(padded.view(-1, x.shape[-1]), size).view(freqs * adapters, -1, blocks_in)
    product = torch.bmm(spectra, stack.view(freqs * adapters, blocks_in, blocks_out))
    return blocks(product.view(freqs, -1, *x.shape[1:-1], blocks_out), size, pad.positions)
