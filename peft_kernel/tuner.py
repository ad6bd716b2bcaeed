"""``AdapterModel``: the model with adapters injected (HF PEFT's ``LoraModel``, ``IA3Model``...).

``PeftModel.base_model`` is one of these; ``.model`` is the user's transformers model. It owns
the adapter lifecycle: add, activate, disable, delete, merge, unload. Each method gets a subclass
named after its record's ``tuner_name`` so ``type(peft_model.base_model).__name__`` reads as in
HF PEFT.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import Any, Iterator

from torch import nn
from tqdm.auto import tqdm

from peft_kernel.errors import AdapterNameError
from peft_kernel.injection import check_adapter_name, inject, replace_with_base, set_trainable, settle_new_adapter
from peft_kernel.layer import AdapterLayer, adapter_layers, walk_modules
from peft_kernel.modules_to_save import ModulesToSaveWrapper
from peft_kernel.plugins import get_registry


class AdapterModel(nn.Module):
    """A transformers (or any torch) model with adapters of one method injected."""

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str = "default", low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, Any] = {}
        self._active: list[str] = [adapter_name]
        self.inject_adapter(self.model, adapter_name, peft_config)

    # ---- HF PEFT names ----------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def prefix(self) -> str:
        config = next(iter(self.peft_config.values()))
        return get_registry().method_for_config(config).prefix

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # ---- the adapter-host interface PeftModel delegates to (PromptLearner has the same) --------
    @property
    def plain_model(self) -> nn.Module:
        return self.model

    def serve(self, args: tuple, kwargs: dict, adapter_names: Any) -> Any:
        """Forward; mixed-batch routing is already published by ``PeftModel`` for the layers."""
        return self.model(*args, **kwargs)

    def serve_generate(self, args: tuple, kwargs: dict, adapter_names: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def release(self) -> None:
        """Give the user's model back as it came (used when loading fails): unlike ``unload``, a
        ``modules_to_save`` wrapper gives back its original module, not the trained copy."""
        for _, layer in adapter_layers(self.model):
            layer.unmerge()
        replace_with_base(self.model, keep_trained_copies=False)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    # ---- lifecycle --------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, peft_config: Any) -> None:
        registry = get_registry()
        check_adapter_name(adapter_name, self.peft_config, registry, peft_config)
        if self.peft_config:
            first = next(iter(self.peft_config.values()))
            if registry.method_for_config(first).peft_type != registry.method_for_config(peft_config).peft_type:
                raise AdapterNameError(
                    f"this model holds {registry.method_for_config(first).peft_type} adapters; a "
                    f"{registry.method_for_config(peft_config).peft_type} adapter cannot join them in one model."
                )
        inject(model, peft_config, adapter_name, registry)
        self.peft_config[adapter_name] = peft_config
        if adapter_name in self._active:
            set_trainable(self.model, self._active, self.peft_config)
        else:  # an extra, inactive adapter: only its own tensors need settling
            settle_new_adapter(self.model, adapter_name)

    def add_adapter(self, adapter_name: str, peft_config: Any) -> None:
        self.inject_adapter(self.model, adapter_name, peft_config)

    def _check_names(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterNameError(f"unknown adapter(s) {unknown}; this model has {sorted(self.peft_config)}.")

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter or several at once (their outputs add up)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_names(names)
        for _, layer in adapter_layers(self.model):
            if layer.merged:
                layer.unmerge()
        self._active = names
        set_trainable(self.model, names, self.peft_config)

    def _adapter_modules(self) -> Iterator[AdapterLayer | ModulesToSaveWrapper]:
        for _, module in walk_modules(self.model, stop=(ModulesToSaveWrapper,)):
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                yield module

    def enable_adapter_layers(self) -> None:
        for module in self._adapter_modules():
            module.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        for module in self._adapter_modules():
            module.enable_adapters(False)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_names([adapter_name])
        for module in self._adapter_modules():
            module.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [a for a in self._active if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self._active = remaining
        set_trainable(self.model, self._active, self.peft_config)

    # ---- merging ----------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if adapter_names is not None:
            self._check_names(adapter_names)
        for _, layer in adapter_layers(self.model):
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, layer in adapter_layers(self.model):
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the active (or given) adapters into the base weights and return the plain model."""
        if adapter_names is not None:
            self._check_names(adapter_names)
        layers = list(adapter_layers(self.model))
        for _, layer in tqdm(layers, disable=not progressbar, desc="merging"):
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return replace_with_base(self.model, keep_trained_copies=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the base model.

        As in HF PEFT, a ``modules_to_save`` module (a classifier head) is replaced by the active
        adapter's trained copy, not by the original: ``unload`` and ``merge_and_unload`` differ only in
        whether the adapter layers are merged. A wrapper whose copies all belong to inactive adapters
        gives back its original module."""
        for _, layer in adapter_layers(self.model):
            layer.unmerge()
        return replace_with_base(self.model, keep_trained_copies=True)


@lru_cache(maxsize=None)
def tuner_class(name: str) -> type[AdapterModel]:
    """A subclass of :class:`AdapterModel` named after a method (``LoraModel``)."""
    return type(name or "AdapterModel", (AdapterModel,), {"__module__": __name__})
