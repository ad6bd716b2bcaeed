"""``modules_to_save``: whole modules trained and saved per adapter (a classifier head, say).

The wrapper keeps ``original_module`` and one trainable copy per adapter in ``modules_to_save``,
so in-memory keys are ``<module>.modules_to_save.<adapter>.<param>`` and on-disk keys are the
plain ``<module>.<param>``, as HF PEFT writes them.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from peft_kernel.routing import current_routing


class ModulesToSaveWrapper(nn.Module):
    """Routes calls to the active adapter's copy of a module, or to the original."""

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: str | None = None
        self._disabled = False
        self.update(adapter_name)
        self.set_adapter(adapter_name)

    @property
    def active_adapter(self) -> str | None:
        return self._active_adapter

    @property
    def weight(self) -> torch.Tensor:
        return self._current().weight

    def update(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
            self.modules_to_save[adapter_name].requires_grad_(True)
        self.original_module.requires_grad_(False)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        chosen = [n for n in names if n in self.modules_to_save]
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name in chosen[:1])
        self._active_adapter = chosen[0] if chosen else None

    def enable_adapters(self, enabled: bool) -> None:
        self._disabled = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self._active_adapter == adapter_name:
            self._active_adapter = next(iter(self.modules_to_save.keys()), None)

    def _current(self) -> nn.Module:
        if self._disabled or self._active_adapter is None:
            return self.original_module
        return self.modules_to_save[self._active_adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        routing = current_routing()
        if routing is None or self._disabled:
            return self._current()(x, *args, **kwargs)
        outputs, order = [], []
        for name, rows in routing.groups(x.shape[0], x.device).items():
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            outputs.append(module(x.index_select(0, rows), *args, **kwargs))
            order.append(rows)
        inverse = torch.argsort(torch.cat(order))
        return torch.cat(outputs).index_select(0, inverse)
