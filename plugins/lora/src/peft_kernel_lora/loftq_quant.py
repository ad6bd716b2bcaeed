"""Reference quantisers for LoftQ, in plain torch (no bitsandbytes, any device).

HF PEFT's LoftQ quantises with bitsandbytes on CUDA; these functions give the same dequantised
weights on CPU:

* 4 bits: NF4 — the flattened weight in blocks of 64, each block scaled by its absolute maximum
  and rounded to the nearest of the 16 NormalFloat levels (ties to the lower level).
* 8 bits: int8 per output row — the weight rounded to float16 first (bitsandbytes' ``Int8Params``
  holds fp16), then ``round(w * 127 / rowmax)`` and back as ``code * rowmax * (1/127)``.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)
"""The widths HF PEFT 0.21 accepts (``nf4`` and ``int8``); it refuses 2 bits and the rest."""

NF4_BLOCK_SIZE = 64

# The 16 NormalFloat-4 levels (quantiles of N(0, 1) scaled to [-1, 1]), as float32 values.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (float32) quantised to NF4 in blocks of 64 and dequantised, same shape."""
    flat = weight.reshape(-1)
    pad = (-flat.numel()) % NF4_BLOCK_SIZE
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, NF4_BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    levels = torch.tensor(NF4_LEVELS, dtype=weight.dtype, device=weight.device)
    scaled = torch.where(absmax > 0, blocks / absmax, torch.zeros_like(blocks))
    codes = (scaled.unsqueeze(-1) - levels).abs().argmin(dim=-1)
    return (levels[codes] * absmax).reshape(-1)[: flat.numel()].reshape(weight.shape)


def int8_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (float32, [out, in]) through fp16 and row-wise absmax int8, dequantised to float32."""
    half = weight.to(torch.float16).to(torch.float32)
    rowmax = half.abs().amax(dim=1, keepdim=True)
    safe = torch.where(rowmax > 0, rowmax, torch.ones_like(rowmax))
    codes = torch.round(half * (127 / safe)).clamp(-127, 127)
    return codes * rowmax * (1 / 127)


def quantize_roundtrip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The dequantised ``bits``-bit version of the 2-D float32 ``weight``."""
    if bits == 4:
        return nf4_roundtrip(weight)
    if bits == 8:
        return int8_roundtrip(weight)
    raise ValueError(f"LoftQ quantises with {' or '.join(map(str, SUPPORTED_BITS))} bits, not {bits}")
