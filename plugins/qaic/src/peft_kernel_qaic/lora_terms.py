"""The per-row LoRA terms of the export graph beyond ``(x @ A) @ B``: DoRA, ``lora_bias``, embeddings.

Each takes the adapter id of every batch row (``ids`` ``[batch]``) and gathers that slot's
tensors, so one batch mixes adapters with and without these features (slots without them hold
zeros, which change nothing). Plain ONNX ops only (Gather, Mul, Add, MatMul).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn


def without_bias(y: torch.Tensor, base: nn.Module) -> torch.Tensor:
    bias = getattr(base, "bias", None)
    return y if bias is None else y - bias


def add_lora(x: torch.Tensor, y: torch.Tensor, base: nn.Module, a: torch.Tensor, b: torch.Tensor,
             rescale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y`` (the base output of ``x``) plus DoRA's rescale ``(f - 1)·(W x)`` (``rescale``),
    ``(x @ A) @ B`` (``B`` carries DoRA's ``f``) and the scaled ``lora_bias`` (``bias``)."""
    if rescale is not None:
        y = y + rescale * without_bias(y, base)
    y = y + torch.matmul(torch.matmul(x, a), b)
    return y if bias is None else y + bias


def stacked_linear(x: torch.Tensor, y: torch.Tensor, base: nn.Module, a: torch.Tensor, b: torch.Tensor,
                   extras: Mapping[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """:func:`add_lora` with each row's slot of ``A`` ``[S, in, R]``, ``B`` ``[S, R, out]`` and the
    ``extras["rescale"]`` / ``extras["bias"]`` stacks (``[S, out]``)."""
    rescale = extras["rescale"][ids].unsqueeze(1) if "rescale" in extras else None
    bias = extras["bias"][ids].unsqueeze(1) if "bias" in extras else None
    return add_lora(x, y, base, a[ids], b[ids], rescale, bias)


def split_inputs(flat: Sequence[torch.Tensor], modules: Sequence[str], extras: Mapping[str, Sequence[str]]
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """The trailing weight inputs of the swap graph, per module ``A``, ``B`` and then its extras
    (``extras[module]``: ``"bias"`` / ``"rescale"``, in that order), as ``{module: (A, B, {kind: t})}``."""
    out, i = {}, 0
    for module in modules:
        kinds = tuple(extras.get(module, ()))
        out[module] = (flat[i], flat[i + 1], {k: flat[i + 2 + j] for j, k in enumerate(kinds)})
        i += 2 + len(kinds)
    return out


def stacked_embedding(input_ids: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      extras: Mapping[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """``h`` (the base embeddings) plus each row's embedding LoRA: ``A`` ``[S, vocab, R]`` read at
    ``(slot, token)`` (one Gather on the flattened table, no per-row copy of it), times that slot's
    ``B`` ``[R, dim]``; DoRA's ``(f - 1)·h`` from ``extras["rescale"]`` ``[S, dim]``."""
    slots, vocab, rank = a.shape
    rows = a.reshape(slots * vocab, rank)[ids.unsqueeze(1) * vocab + input_ids]  # [B, S, R]
    if "rescale" in extras:
        h = h + extras["rescale"][ids].unsqueeze(1) * h
    return h + torch.bmm(rows, b[ids])


def input_embedding(input_ids: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    extras: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``h`` plus one adapter's embedding LoRA from graph inputs ``A`` ``[vocab, r]``, ``B``
    ``[r, dim]`` (and DoRA's ``extras["rescale"]`` ``[dim]``)."""
    if "rescale" in extras:
        h = h + extras["rescale"] * h
    return h + torch.matmul(a[input_ids], b)
