"""The inverse 2-D discrete wavelet transform of WaveFT, in torch (differentiable, any device).

The synthesis filters come from PyWavelets (``pywt.Wavelet(name).rec_lo / rec_hi``). The
coefficient matrix ``C [N0, N1]`` is laid out in four quadrants split at ``h = ceil(N / 2)`` along
each axis, and each coefficient is placed as in HF PEFT's WaveFT (found by feeding it one-hot
coefficients): along an axis, a coefficient at index ``k < h`` starts its filter at ``2k``; one at
``h + j`` starts it at ``2j - (L - 2)`` (``L`` the filter length); what falls outside ``[0, N)`` is
dropped. The filter along rows is the low-pass one for the left quadrants, the high-pass one for
the right ones; along columns, low-pass for the top quadrants, high-pass for the bottom ones::

    delta = R_lo^a C[:h0, :h1] Q_lo^a' + R_lo^b C[h0:, :h1] Q_hi^a' + R_hi^a C[:h0, h1:] Q_lo^b' + R_hi^b C[h0:, h1:] Q_hi^b'

(``R^a`` / ``R^b``: the placements of the first / second half along rows, ``Q`` along columns, ``'``
a transpose).
Written as one standard synthesis step per axis: each quadrant is padded to ``m = h + (L - 2) / 2``
per axis (a first-half axis by ``(L - 2) / 2`` zeros in front, a second-half one at its end), each
axis is upsampled and filtered by a strided transposed convolution (``y[2k + t] += c[k] f[t]``),
and the result is cropped to ``[L - 2, L - 2 + N)``. That costs ``O(N0 N1 L)``.
"""

from __future__ import annotations

import functools
import math

import pywt
import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def synthesis_filters(family: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(rec_lo, rec_hi)`` of ``family`` (PyWavelets' reconstruction filters), as Python floats."""
    wavelet = pywt.Wavelet(family)
    return tuple(wavelet.rec_lo), tuple(wavelet.rec_hi)


def _pad(block: torch.Tensor, dim: int, first_half: bool, pad: int, size: int) -> torch.Tensor:
    """``block`` padded along ``dim`` to ``size``: ``pad`` zeros in front for a first-half block."""
    before = pad if first_half else 0
    after = size - before - block.shape[dim]
    widths = [0, 0] * (block.dim() - 1 - dim) + [before, after]
    return F.pad(block, widths)


def _synthesize_last(low: torch.Tensor, high: torch.Tensor, filters: torch.Tensor, length: int) -> torch.Tensor:
    """One synthesis step along the last dimension: ``up(low) * lo + up(high) * hi``, cropped to
    ``[L - 2, L - 2 + length)``. ``filters`` is ``[2, 1, L]`` (low-pass, high-pass)."""
    batch = low.shape[:-1]
    signal = torch.stack([low, high], dim=-2).reshape(-1, 2, low.shape[-1])
    out = F.conv_transpose1d(signal, filters, stride=2)
    start = filters.shape[-1] - 2
    return out[:, 0, start:start + length].reshape(*batch, length)


def inverse_dwt2(coefficients: torch.Tensor, family: str) -> torch.Tensor:
    """The ``[N0, N1]`` matrix whose WaveFT wavelet coefficients (layout in the module docstring)
    are ``coefficients`` (``[N0, N1]``), computed in the coefficients' dtype."""
    rows, cols = coefficients.shape
    rec_lo, rec_hi = synthesis_filters(family)
    filters = torch.tensor([rec_lo, rec_hi], dtype=coefficients.dtype, device=coefficients.device).unsqueeze(1)
    pad = (len(rec_lo) - 2) // 2
    h0, h1 = math.ceil(rows / 2), math.ceil(cols / 2)
    m0, m1 = h0 + pad, h1 + pad

    def block(r: slice, c: slice, top: bool, left: bool) -> torch.Tensor:
        return _pad(_pad(coefficients[r, c], 0, top, pad, m0), 1, left, pad, m1)

    top_left = block(slice(None, h0), slice(None, h1), True, True)
    bottom_left = block(slice(h0, None), slice(None, h1), False, True)
    top_right = block(slice(None, h0), slice(h1, None), True, False)
    bottom_right = block(slice(h0, None), slice(h1, None), False, False)
    # along columns: the top quadrants low-pass, the bottom ones high-pass; each pair then shares a row filter
    row_low = _synthesize_last(top_left, bottom_left, filters, cols)  # [m0, cols], low-pass along rows next
    row_high = _synthesize_last(top_right, bottom_right, filters, cols)
    return _synthesize_last(row_low.T, row_high.T, filters, rows).T
