"""Low-rank factors that a layer derives from its live tensors (VB-LoRA composes them from a vector
bank and logits; any method whose ``low_rank_factors`` are computed, not stored).

The stacked kernels of :mod:`peft_kernel_lowrank.mixed` decide whether a layer's stack is fresh by
the identity, ``_version`` and ``data_ptr`` of the factors ``low_rank_factors`` returns, so derived
factors must be the *same tensor objects* for as long as their sources do not change, and new ones
as soon as they do. :class:`DerivedFactors` keeps them so, per adapter.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class DerivedFactors:
    """Per-adapter cache of values computed from source tensors, recomputed when a source is
    replaced (identity), written in place (``_version``: optimizer steps, ``copy_`` from a load),
    moved (``data_ptr``, dtype, device). The sources are kept referenced, so a freed storage's
    address cannot be reused by a new one and look unchanged. Under autograd with a source that
    requires grad, values are computed afresh each call and not cached."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[torch.Tensor, ...], list[tuple[int, int, torch.dtype, torch.device]], object]] = {}

    def get(self, adapter_name: str, sources: tuple[torch.Tensor, ...], compute: Callable[[], T]) -> T:
        """``compute()``, cached for ``adapter_name`` while ``sources`` are unchanged."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return compute()
        state = [(t._version, t.data_ptr(), t.dtype, t.device) for t in sources]
        entry = self._entries.get(adapter_name)
        if entry is None or entry[1] != state or len(entry[0]) != len(sources) or any(
                t is not s for t, s in zip(sources, entry[0])):
            # normal tensors even under ``torch.inference_mode()``: inference tensors have no
            # ``_version``, so the stacked kernels could not check them, and autograd outside that
            # mode could not use them
            with torch.inference_mode(False), torch.no_grad():
                entry = (sources, state, compute())
            self._entries[adapter_name] = entry
        return entry[2]  # type: ignore[return-value]

    def __len__(self) -> int:
        """How many adapters have a cached value."""
        return len(self._entries)

    def keep(self, adapter_names: list[str]) -> None:
        """Forget every adapter not in ``adapter_names`` (deleted adapters)."""
        for name in [n for n in self._entries if n not in adapter_names]:
            del self._entries[name]

    def drop(self, adapter_name: str) -> None:
        """Forget ``adapter_name`` (deleted adapters)."""
        self._entries.pop(adapter_name, None)
