"""A cache for a value derived from an adapter's live tensors (a folded ``A`` such as AdaLoRA's
``A * E``, a scale read from a tensor), so that :func:`LowRankLayer.low_rank_factors` hands out the *same* tensor object until
one of its inputs changes, which keeps the stacked kernels' freshness check (identity, version,
address) of :mod:`peft_kernel_lowrank.mixed` valid without rebuilding a stack on every forward."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")


class DerivedCache:
    """``get(key, inputs, compute)``: ``compute()`` under ``no_grad``, recomputed only when an input
    tensor was replaced, written in place, moved or cast since the last call for ``key``."""

    def __init__(self) -> None:
        # the input tensors themselves are kept (not their ids), so a replaced tensor is never
        # mistaken for the old one at a reused address
        self._entries: dict[str, tuple[tuple[torch.Tensor, ...], list[tuple[int, int, torch.dtype]], Any]] = {}

    def get(self, key: str, inputs: tuple[torch.Tensor, ...], compute: Callable[[], T]) -> T:
        state = [(t._version, t.data_ptr(), t.dtype) for t in inputs]
        entry = self._entries.get(key)
        if entry is None or entry[1] != state or any(t is not c for t, c in zip(inputs, entry[0])):
            with torch.no_grad():
                entry = (inputs, state, compute())
            self._entries[key] = entry
        return entry[2]

    def drop(self, prefix: str) -> None:
        """Forget every entry whose key starts with ``prefix`` (an adapter's name)."""
        for key in [k for k in self._entries if k.startswith(prefix)]:
            del self._entries[key]
