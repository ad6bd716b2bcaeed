"""The per-row LoRA terms of the export graph beyond ``(x @ A) @ B``: DoRA, ``lora_bias``, embeddings.

Each takes the adapter id of every batch row (``ids`` ``[batch]``) and gathers that slot's
tensors, so one batch mixes adapters with and without these features (slots without them hold
zeros, which change nothing). Plain ONNX ops only (Gather, Mul, Add, MatMul).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def without_bias(y: torch.Tensor, base: nn.Module) -> torch.Tensor:
    bias = getattr(base, "bias", None)
    return y if bias is None else y - bias


def stacked_linear(x: torch.Tensor, y: torch.Tensor, base: nn.Module, a: torch.Tensor, b: torch.Tensor,
                   extras: Mapping[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """``y`` (the base output of ``x``) plus each row's adapter: DoRA's rescale ``(f - 1)·(W x)``
    (``extras["rescale"]`` ``[S, out]``), ``(x @ A) @ B`` (``B`` carries DoRA's ``f``), and the
    scaled ``lora_bias`` (``extras["bias"]`` ``[S, out]``)."""
    if "rescale" in extras:
        y = y + extras["rescale"][ids].unsqueeze(1) * without_bias(y, base)
    y = y + torch.bmm(torch.bmm(x, a[ids]), b[ids])
    if "bias" in extras:
        y = y + extras["bias"][ids].unsqueeze(1)
    return y


def stacked_embedding(input_ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each row's embedding LoRA: ``A`` ``[S, vocab, R]`` read at ``(slot, token)`` (one Gather on
    the flattened table, no per-row copy of it), times that slot's ``B`` ``[R, dim]``."""
    slots, vocab, rank = a.shape
    rows = a.reshape(slots * vocab, rank)[ids.unsqueeze(1) * vocab + input_ids]  # [B, S, R]
    return torch.bmm(rows, b[ids])


def input_embedding(input_ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One adapter's embedding LoRA from graph inputs ``A`` ``[vocab, r]`` and ``B`` ``[r, dim]``."""
    return torch.matmul(a[input_ids], b)
