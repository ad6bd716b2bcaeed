"""Loads are transactions: what a failed load changed is put back.

Two pieces, both generic (no method is named here):

* :func:`guarding_base_weights` snapshots the base layers' parameters that creating an adapter may
  rewrite in place — only for configs whose ``rewrites_base_weights()`` says so (PiSSA/OLoRA-style
  initialisations), so ordinary adapters cost nothing. Injection opens a guard around layer
  creation; guards nest, and an inner guard that succeeds hands its snapshots to the outer one, so
  ``load_adapter`` / ``from_pretrained`` can still restore the base when the weights fail to load
  after injection succeeded.
* :class:`AdapterSnapshot` records what a load into a model can change besides base weights:
  which adapters exist, the tensors of an adapter that is being overwritten, the active
  adapter(s), every parameter's ``requires_grad`` and every module's train/eval flag
  (:class:`ModuleFlags`); :func:`wrap_and_load` gives ``from_pretrained``'s caller the model back.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

_ACTIVE: contextvars.ContextVar[BaseWeightGuard | None] = contextvars.ContextVar("peft_kernel_base_guard", default=None)


class BaseWeightGuard:
    """Copies of base-layer parameters taken before an adapter's initialisation could rewrite them."""

    def __init__(self) -> None:
        self._saved: list[tuple[nn.Module, str, torch.Tensor]] = []
        self._seen: set[tuple[int, str]] = set()

    def save(self, config: Any, base_layers: Iterable[nn.Module]) -> None:
        """Snapshot ``base_layers``' own parameters if ``config`` declares that it rewrites them."""
        rewrites = getattr(config, "rewrites_base_weights", None)
        if rewrites is None or not rewrites():
            return
        for layer in base_layers:
            layer = getattr(layer, "base_layer", layer)  # an adapter layer already wrapping it
            for name, param in layer.named_parameters(recurse=False):
                if (id(layer), name) not in self._seen:
                    self._seen.add((id(layer), name))
                    self._saved.append((layer, name, param.detach().clone()))

    def restore(self) -> None:
        with torch.no_grad():
            for layer, name, saved in reversed(self._saved):
                current = layer._parameters[name]
                if current.shape == saved.shape and current.dtype == saved.dtype:
                    current.copy_(saved)
                else:
                    current.data = saved
        self._saved.clear()
        self._seen.clear()

    def _absorb(self, inner: BaseWeightGuard) -> None:
        for layer, name, saved in inner._saved:
            if (id(layer), name) not in self._seen:
                self._seen.add((id(layer), name))
                self._saved.append((layer, name, saved))


@contextlib.contextmanager
def guarding_base_weights() -> Iterator[BaseWeightGuard]:
    """Restore snapshotted base weights if the block raises; nested guards pass snapshots outward."""
    outer = _ACTIVE.get()
    guard = BaseWeightGuard()
    token = _ACTIVE.set(guard)
    try:
        yield guard
    except BaseException:
        guard.restore()
        raise
    finally:
        _ACTIVE.reset(token)
    if outer is not None:
        outer._absorb(guard)


class ModuleFlags:
    """Every parameter's ``requires_grad`` and every module's train/eval flag, by name."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.training = {name: m.training for name, m in model.named_modules()}

    def restore(self) -> None:
        for name, param in self.model.named_parameters():
            if name in self.requires_grad:
                param.requires_grad_(self.requires_grad[name])
        for name, module in self.model.named_modules():
            if name in self.training:
                module.training = self.training[name]


class AdapterSnapshot:
    """What loading ``adapter_name`` into ``model`` (a ``PeftModel``) may change, to put back on failure."""

    def __init__(self, model: nn.Module, adapter_name: str) -> None:
        from peft_kernel.adapter_io import adapter_state_dict

        self.model = model
        self.adapter_name = adapter_name
        self.existed = adapter_name in model.peft_config
        self.config = model.peft_config[adapter_name].copy() if self.existed else None
        self.active = list(model.active_adapters) if model.peft_config else []
        self.tensors = (
            {k: v.detach().clone() for k, v in adapter_state_dict(model, adapter_name=adapter_name,
                                                                     save_embedding_layers=False).items()}
            if self.existed else {}
        )
        self.flags = ModuleFlags(model)

    def restore(self) -> None:
        from peft_kernel.adapter_io import load_adapter_state_dict

        model, name = self.model, self.adapter_name
        if not self.existed and name in model.peft_config:
            model._host.delete_adapter(name)
        if self.existed:
            model.peft_config[name] = self.config
            if self.tensors:
                load_adapter_state_dict(model, self.tensors, name)
        if self.active and list(model.active_adapters) != self.active:
            model._host.set_adapter(self.active if len(self.active) > 1 else self.active[0])
        self.flags.restore()


def wrap_and_load(model: nn.Module, make: Callable[[], Any], load: Callable[[Any], None]) -> Any:
    """``from_pretrained``'s transaction: ``make()`` wraps ``model``, ``load(wrapper)`` fills it; on
    any error the wrapper is released and the caller's ``model`` is given back as it was (modules,
    base weights an initialisation rewrote, ``requires_grad`` and train/eval flags)."""
    flags = ModuleFlags(model)
    with guarding_base_weights():
        wrapper = make()
        try:
            load(wrapper)
        except BaseException:
            wrapper._host.release()
            flags.restore()
            raise
    return wrapper


@contextlib.contextmanager
def load_transaction(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """Run a load into ``model``; on any error the model is given back as it was, then it re-raises."""
    snapshot = AdapterSnapshot(model, adapter_name)
    with guarding_base_weights():
        try:
            yield
        except BaseException:
            snapshot.restore()
            raise
