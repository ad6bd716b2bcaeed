"""``get_layer_status`` / ``get_model_status``: HF PEFT's report of what the adapters in a model are
doing (enabled, active, merged, trainable, devices), per layer and for the whole model.

Also accepts a plain model with adapters injected by ``inject_adapter_in_model``. ``"irregular"``
marks a model whose layers disagree, as in HF PEFT.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Literal

import torch

from torch import nn

from peft_kernel.containers import BufferDict
from peft_kernel.layer import AdapterLayer, walk_modules
from peft_kernel.modules_to_save import ModulesToSaveWrapper

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _agree(values: list[Any]) -> Any:
    """True / False when every value is that, else ``"irregular"``."""
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _is_peft_model(model: nn.Module) -> bool:
    """A ``PeftModel`` (or ``PeftMixedModel``): what holds an adapter host (``peft_kernel.host``)."""
    return "_host" in getattr(model, "__dict__", {})


def _root(model: nn.Module, caller: str) -> nn.Module:
    if _is_peft_model(model):
        # HF PEFT's test: its base_model is no tuner (a host that wraps layers is its base_model)
        if vars(model)["_host"] is not model.base_model:
            raise TypeError(
                f"{caller}() got an invalid PeftModel instance; prefix tuning and adaption prompt are not supported."
            )
        return model.base_model
    return model


def _module_type(module: nn.Module) -> str:
    """HF PEFT's names: ``lora.Linear`` (also over a GPT-2 ``Conv1D``), ``lora.Embedding``, ``ia3.Conv2d``,
    ``delora.DeloraLinear`` (a layer's ``status_type_names``), IA3's bare ``Linear``..."""
    if isinstance(module, ModulesToSaveWrapper):
        return "ModulesToSaveWrapper"
    base = type(module.base_layer).__name__
    kind = "Linear" if base == "Conv1D" else base
    prefix = str(getattr(module.peft_type, "value", module.peft_type)).lower()
    if not prefix:
        return type(module).__name__
    names = getattr(module, "status_type_names", {})
    name = names.get(kind, names.get("*", kind))
    return f"{prefix}.{name}" if getattr(module, "status_type_prefixed", True) else name


def _per_adapter(module: nn.Module, attrs: tuple[str, ...], what: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = collections.defaultdict(list)
    for attr in attrs:
        container = getattr(module, attr, None)
        if isinstance(container, nn.ModuleDict):
            for key, sub in container.items():
                out[key].extend(getattr(p, what) for p in sub.parameters())
        elif isinstance(container, nn.ParameterDict):
            for key, p in container.items():
                out[key].append(getattr(p, what))
        elif isinstance(container, BufferDict) and what != "requires_grad":  # frozen, never trained: no say in it
            for key, b in container.items():
                out[key].append(getattr(b, what))
    return out


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One :class:`TunerLayerStatus` per adapter layer and ``modules_to_save`` wrapper, in module order."""
    root = _root(model, "get_layer_status")
    statuses = []
    for name, module in walk_modules(root, stop=(ModulesToSaveWrapper,)):
        if isinstance(module, AdapterLayer):
            layer_names, other_names = module.adapter_layer_names, module.other_param_names
            enabled, active = not module.disable_adapters, module.active_adapters
            merged, available = list(module.merged_adapters), module.adapter_names()
        elif isinstance(module, ModulesToSaveWrapper):
            layer_names, other_names = ("modules_to_save",), ()
            enabled = not module._disabled
            active = [module.active_adapter] if module.active_adapter is not None else []
            merged, available = [], list(module.modules_to_save)
        else:
            continue
        grads = _per_adapter(module, layer_names, "requires_grad")
        devices = _per_adapter(module, (*layer_names, *other_names), "device")
        backend = getattr(module, "quantization_backend", None)
        statuses.append(TunerLayerStatus(
            name=name,
            module_type=_module_type(module),
            enabled=enabled,
            active_adapters=active,
            merged_adapters=merged,
            requires_grad={k: _agree(v) for k, v in grads.items()},
            available_adapters=sorted(available),
            devices={k: sorted({d.type for d in v}) for k, v in devices.items()},
            quantization_backend=getattr(backend, "backend_name", None) if backend is not None else None,
        ))
    if not statuses:
        raise ValueError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT adapters "
            "injected in the model."
        )
    return statuses


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapters' state across the whole model (see :class:`TunerModelStatus`)."""
    if _is_peft_model(model):
        _root(model, "get_model_status")
        base_model_type = type(model.get_base_model()).__name__
        adapter_model_type = type(model.base_model).__name__
        peft_types = {k: str(getattr(c.peft_type, "value", c.peft_type)) for k, c in model.peft_config.items()}
    else:
        base_model_type = type(model).__name__ if _is_pretrained(model) else "other"
        adapter_model_type, peft_types = "None", {}
    trainable = total = 0
    for param in model.parameters():
        count = param_count(param)
        total += count
        trainable += count if param.requires_grad else 0
    layers = get_layer_status(model)

    enabled_set = {s.enabled for s in layers}
    enabled: bool | Irregular = enabled_set.pop() if len(enabled_set) == 1 else "irregular"
    available = sorted(set().union(*(s.available_adapters for s in layers)))
    active_sets = {tuple(s.active_adapters) for s in layers}
    active: list[str] | Irregular = list(active_sets.pop()) if len(active_sets) == 1 else "irregular"
    merged_any = set().union(*(s.merged_adapters for s in layers))
    merged: list[str] | Irregular = sorted(merged_any)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_any for s in layers):
        merged = "irregular"
    grads: dict[str, list[Any]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for key, value in s.requires_grad.items():
            grads[key].append(value)
        for key, value in s.devices.items():
            devices[key].update(value)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={k: _agree(v) for k, v in grads.items()},
        available_adapters=available,
        devices={k: sorted(v) for k, v in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )


def _is_pretrained(model: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
               for cls in type(model).__mro__)


__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]


def param_count(param: torch.Tensor) -> int:
    """Elements of ``param`` as HF PEFT counts them (DeepSpeed ZeRO-3 and 4-bit packed storage included)."""
    count = param.numel()
    if count == 0 and hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3 keeps an empty local tensor
        count = param.ds_numel
    if type(param).__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values per byte of its storage
        if hasattr(param, "element_size"):
            size = param.element_size()
        elif hasattr(param, "quant_storage"):
            size = param.quant_storage.itemsize
        else:
            size = 1
        count = count * 2 * size
    return count
