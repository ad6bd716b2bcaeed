"""Kronecker-product deltas applied without building them (LoKr on a Linear base).

For ``delta W = kron(w1 [out_l, in_m], w2 [out_k, in_n])`` and an input row ``x`` read as a matrix
``X [in_m, in_n]``, ``delta W @ x`` is ``w1 @ X @ w2.T`` read back as ``[out_l * out_k]``: two small
matmuls, ``in * out_k + out * in_m`` multiply-adds per token instead of ``in * out`` (plus building
the ``in * out`` delta on every forward, which HF PEFT does).

Mixed batches (one adapter per row) gather each row's ``w1`` / ``w2`` from a stack of every
adapter's factors (one all-zero slot for rows without an adapter) and run the same two products
batched over rows: no loop over adapters or rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from peft_kernel_lowrank.derived import DerivedFactors

Factors = tuple[torch.Tensor, torch.Tensor]
"""``(w1, w2)`` of one adapter, the scale folded into ``w1``."""


def kron_apply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``x @ kron(w1, w2).T`` for ``x [..., in_m * in_n]``, without building the Kronecker product."""
    lead = x.shape[:-1]
    z = x.reshape(-1, w2.shape[1]) @ w2.t()  # [tokens * in_m, out_k]
    y = torch.matmul(w1, z.view(-1, w1.shape[1], w2.shape[0]))  # [tokens, out_l, out_k]
    return y.reshape(*lead, w1.shape[0] * w2.shape[0])


class KronStack:
    """Every adapter's ``(w1, w2)`` of one layer stacked ``[S + 1, ...]`` (last slot zeros), rebuilt
    when an adapter is added, removed, rescaled or written to (:class:`DerivedFactors` freshness)."""

    def __init__(self) -> None:
        self._cache = DerivedFactors()

    def get(self, names: tuple[str, ...], scalings: tuple[float, ...], sources: tuple[torch.Tensor, ...],
            build: Callable[[], dict[str, Factors]]) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor] | None:
        """``(names, w1s, w2s)``, or ``None`` when the adapters' factor shapes differ (then the
        caller runs each adapter on its own rows)."""
        key = (names, scalings)
        value = self._cache.get("stack", sources, lambda: (key, _stack(names, build())))
        if value[0] != key:
            self._cache.drop("stack")
            value = self._cache.get("stack", sources, lambda: (key, _stack(names, build())))
        return None if value[1] is None else (names, *value[1])


def _stack(names: tuple[str, ...], factors: dict[str, Factors]) -> tuple[torch.Tensor, torch.Tensor] | None:
    shapes = {(f[0].shape, f[1].shape, f[0].dtype, f[0].device) for f in factors.values()}
    if len(shapes) != 1:
        return None
    w1 = torch.stack([factors[n][0] for n in names] + [torch.zeros_like(factors[names[0]][0])])
    w2 = torch.stack([factors[n][1] for n in names] + [torch.zeros_like(factors[names[0]][1])])
    return w1, w2


def kron_apply_rows(x: torch.Tensor, w1s: torch.Tensor, w2s: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of ``x [rows, ..., in]`` times ``kron(w1s[slots[i]], w2s[slots[i]]).T``."""
    rows = x.shape[0]
    w1, w2 = w1s.index_select(0, slots), w2s.index_select(0, slots)
    out_l, in_m = w1.shape[1:]
    out_k, in_n = w2.shape[1:]
    z = torch.bmm(x.reshape(rows, -1, in_n), w2.transpose(1, 2))  # [rows, tokens * in_m, out_k]
    y = torch.matmul(w1[:, None], z.view(rows, -1, in_m, out_k))  # [rows, tokens, out_l, out_k]
    return y.reshape(*x.shape[:-1], out_l * out_k)
