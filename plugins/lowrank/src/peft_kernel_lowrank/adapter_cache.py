"""A value derived from everything a layer holds for one adapter (a dense ``delta W``, a spectrum,
a sparse matrix), computed once and reused across forwards while the adapter is unchanged.

Fresh means: the same tensors in the layer's ``adapter_layer_names`` / ``other_param_names``
containers for that adapter, not written in place, not moved (see :class:`DerivedFactors`), and
equal non-tensor settings (a ``scaling`` changed by ``rescale_adapter_scale``, a block size). Any
other input of ``compute`` (the base weight, say) must be passed as ``extra`` to be watched.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from torch import nn

from peft_kernel_lowrank.derived import DerivedFactors

T = TypeVar("T")


def adapter_state(layer: nn.Module, adapter_name: str) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...]]:
    """(the adapter's tensors, its other settings) across the layer's per-adapter containers;
    modules (dropout) contribute their parameters and buffers."""
    tensors: list[torch.Tensor] = []
    settings: list[Any] = []
    for attr in (*layer.adapter_layer_names, *layer.other_param_names):
        container = getattr(layer, attr, None)
        value = container[adapter_name] if container is not None and adapter_name in container else None
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, nn.Module):
            tensors += [*value.parameters(), *value.buffers()]
        else:
            settings.append(value)
    return tuple(tensors), tuple(settings)


class AdapterCache:
    """One cached value per adapter of a layer (hold one instance per kind of value)."""

    def __init__(self) -> None:
        self._derived = DerivedFactors()
        self._settings: dict[str, tuple[Any, ...]] = {}

    def get(self, layer: nn.Module, adapter_name: str, compute: Callable[[], T],
            extra: tuple[torch.Tensor, ...] = ()) -> T:
        """``compute()``, reused while ``adapter_name`` is unchanged in ``layer`` and the ``extra``
        tensors are unchanged (always fresh under autograd when one of them requires grad)."""
        tensors, settings = adapter_state(layer, adapter_name)
        tensors += extra
        if self._settings.get(adapter_name) != settings:
            self._derived.drop(adapter_name)
            self._settings[adapter_name] = settings
        return self._derived.get(adapter_name, tensors, compute)

    def drop(self, adapter_name: str) -> None:
        """Forget ``adapter_name`` (deleted adapters)."""
        self._derived.drop(adapter_name)
        self._settings.pop(adapter_name, None)
