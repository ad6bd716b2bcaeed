"""A per-adapter cache of tensors derived from an adapter's live tensors (folded low-rank factors).

The stacked mixed-batch kernels of :mod:`peft_kernel_lowrank.mixed` tell a fresh stack by the
*identity* of the factors ``low_rank_factors`` returns, so a layer whose factors are computed (DeLoRA's
normalised ``A``, OSF's concatenated SVD parts) must hand back the same tensor objects while nothing
changed. :class:`DerivedFactors` does that: it rebuilds an adapter's value only when one of its
source tensors was replaced, moved, recast or written to in place.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")


class DerivedFactors:
    """``{adapter name: value}`` built from source tensors, rebuilt (without autograd) when any source
    changed: another tensor object, ``_version`` (in-place writes: optimizer steps, ``copy_`` on
    load), ``data_ptr`` (``.to()``, ``.data =``), dtype or device. The sources are kept, not their
    ids, so a replaced tensor is never mistaken for the old one at a reused address."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[torch.Tensor, ...], list[tuple[object, ...]], object]] = {}

    def get(self, name: str, sources: Sequence[torch.Tensor], build: Callable[[], T]) -> T:
        state = [(t._version, t.data_ptr(), t.dtype, t.device) for t in sources]
        entry = self._entries.get(name)
        if (entry is None or entry[1] != state or len(entry[0]) != len(sources)
                or any(t is not kept for t, kept in zip(sources, entry[0]))):
            with torch.no_grad():
                entry = (tuple(sources), state, build())
            self._entries[name] = entry
        return entry[2]  # type: ignore[return-value]

    def drop(self, name: str) -> None:
        """Forget ``name``'s value (the adapter was deleted)."""
        self._entries.pop(name, None)
