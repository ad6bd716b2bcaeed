"""``BufferDict``: a per-adapter container of buffers, next to ``nn.ParameterDict``.

Adapter layers keep each adapter's tensors in containers keyed by adapter name. Trainable tensors
go in ``nn.ParameterDict`` / ``nn.ModuleDict``; frozen tensors that are part of the adapter — VeRA's
and RandLora's random projections, DeLoRA's weight norms — go in a ``BufferDict``: they move with
``.to()``, are saved and loaded with the adapter, and are never parameters (so optimizers and
trainable-parameter counts do not see them, as in HF PEFT).
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import nn


class BufferDict(nn.Module):
    """``{adapter name: tensor}`` held as buffers of this module (``persistent`` as ``register_buffer``)."""

    def __init__(self, buffers: Mapping[str, torch.Tensor] | None = None, persistent: bool = True) -> None:
        super().__init__()
        self.persistent = persistent
        for key, value in (buffers or {}).items():
            self[key] = value

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"BufferDict holds tensors; got {type(value).__name__} for {key!r}")
        self.register_buffer(key, value, persistent=self.persistent)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def keys(self) -> list[str]:
        return list(self._buffers)

    def values(self) -> list[torch.Tensor]:
        return list(self._buffers.values())

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._buffers.items())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._buffers.items())
