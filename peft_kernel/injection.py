"""Putting an adapter into a model: match targets, create or update layers, all or nothing.

Every layer for the new adapter is built before any module is swapped, so an unsupported layer,
a shape problem or a plugin error leaves the model exactly as it was.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from peft_kernel.errors import AdapterNameError, TargetNotFoundError
from peft_kernel.layer import AdapterLayer, walk_modules
from peft_kernel.modules_to_save import ModulesToSaveWrapper
from peft_kernel.plugins import Registry, get_registry
from peft_kernel.targeting import base_of, candidate_modules, compress_target_modules, expand_target_modules, no_match_error

_NAME_OK = re.compile(r"[A-Za-z0-9_\-]+")
MAX_ADAPTER_NAME_LENGTH = 128
"""An adapter name becomes a folder name (at most 255 bytes on most file systems) and part of every
parameter name; longer names are refused before anything is created or written."""


def check_adapter_name(adapter_name: str, existing: dict[str, Any], registry: Registry, config: Any = None) -> None:
    """Refuse names that are taken, that break module paths, or that contain the prefix of
    ``config``'s method (HF PEFT's rule: ``lora_x`` is no name for a LoRA adapter)."""
    if isinstance(adapter_name, str) and len(adapter_name) > MAX_ADAPTER_NAME_LENGTH:
        raise AdapterNameError(
            f"adapter name {adapter_name[:40]!r}... is {len(adapter_name)} characters long; use at most "
            f"{MAX_ADAPTER_NAME_LENGTH} (it becomes a folder name when saved)."
        )
    if not isinstance(adapter_name, str) or not _NAME_OK.fullmatch(adapter_name):
        raise AdapterNameError(
            f"adapter name {adapter_name!r} is not usable: use letters, digits, '_' or '-' (no dots), "
            "since it becomes part of parameter names."
        )
    if adapter_name in existing:
        raise AdapterNameError(
            f"an adapter named {adapter_name!r} already exists (adapters: {sorted(existing)}); "
            "pick another name or delete_adapter() it first."
        )
    if adapter_name == "__base__":
        raise AdapterNameError("'__base__' is reserved: it selects the base model in mixed batches.")
    record = registry.method_for_config(config) if config is not None else None
    if record is not None and record.prefix in adapter_name:
        raise AdapterNameError(
            f"adapter name {adapter_name!r} collides with the parameter prefix {record.prefix!r} of "
            f"{record.peft_type}; state-dict keys would become ambiguous. Pick another name."
        )


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def _matches(names: Any, path: str) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def inject(model: nn.Module, config: Any, adapter_name: str, registry: Registry | None = None) -> list[str]:
    """Add ``adapter_name`` built from ``config`` to ``model``; return the targeted module paths."""
    registry = registry or get_registry()
    record = registry.method_for_config(config)
    expand_target_modules(config, model, record)
    hook = registry.hook
    hook.peft_kernel_prepare_config(config=config, model=model)
    matched = [
        (name, module)
        for name, module in candidate_modules(model)
        if not isinstance(module, ModulesToSaveWrapper)
        and hook.peft_kernel_match_target(config=config, module_name=name, module=module, model=model)
    ]
    saved_whole = [name for name, _ in candidate_modules(model) if _matches(getattr(config, "modules_to_save", None) or (), name)]
    # modules_to_save take precedence (HF PEFT's rule): nothing inside a module saved whole gets an adapter
    matched = [(name, m) for name, m in matched if not any(name == w or name.startswith(w + ".") for w in saved_whole)]
    if not matched:
        raise no_match_error(config, model)
    compress_target_modules(config, model, [name for name, _ in matched])
    new_layers: dict[str, AdapterLayer] = {}
    for name, module in matched:
        if isinstance(module, AdapterLayer):
            if module.peft_type and module.peft_type != record.peft_type:
                raise TargetNotFoundError(
                    f"module {name!r} already holds a {module.peft_type} adapter; one model mixes no adapter "
                    f"types, so a {record.peft_type} adapter cannot be added to it."
                )
            continue
        layer = hook.peft_kernel_create_layer(config=config, adapter_name=adapter_name, base_layer=module, module_name=name)
        if layer is None:
            raise TargetNotFoundError(
                f"module {name!r} of type {type(module).__name__} matched target_modules, but no installed plugin "
                f"can wrap it with a {record.peft_type} adapter. Narrow target_modules, or install/write a plugin "
                "implementing peft_kernel_create_layer for this layer type."
            )
        layer.peft_type = record.peft_type
        new_layers[name] = layer
    updated: list[AdapterLayer] = []
    try:
        for name, module in matched:
            if isinstance(module, AdapterLayer):
                module.update_layer(adapter_name, config, module_name=name)
                updated.append(module)
    except BaseException:
        for layer in updated:
            layer.delete_adapter(adapter_name)
        raise
    for name, layer in new_layers.items():
        _set_module(model, name, layer)
    wrap_modules_to_save(model, getattr(config, "modules_to_save", None), adapter_name)
    return [name for name, _ in matched]


def wrap_modules_to_save(model: nn.Module, names: Any, adapter_name: str) -> None:
    if not names:
        return
    for path, module in list(candidate_modules(model)):
        if not _matches(names, path) or isinstance(module, AdapterLayer):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
        else:
            _set_module(model, path, ModulesToSaveWrapper(module, adapter_name))


def set_trainable(model: nn.Module, active: list[str], configs: dict[str, Any]) -> None:
    """Freeze everything but the active adapters (and the biases their configs ask for).

    Adapter layers' per-adapter containers are not walked for the freeze: ``set_adapter`` sets
    every tensor in them, so adding the n-th adapter does not cost n times the first."""
    modules = [m for _, m in walk_modules(model)]
    for module in modules:
        for param in module._parameters.values():
            if param is not None and param.requires_grad:
                param.requires_grad_(False)
    for module in modules:
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            module.set_adapter(active)
    for name in active:
        config = configs.get(name)
        if config is None:
            continue
        if getattr(config, "inference_mode", False):
            for module in modules:
                if isinstance(module, AdapterLayer):
                    for p in module.adapter_parameters(name):
                        p.requires_grad_(False)
                elif isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
                    module.modules_to_save[name].requires_grad_(False)
            continue
        bias = getattr(config, "bias", "none")
        if bias == "all":
            for pname, param in model.named_parameters():
                if pname.endswith("bias") and ".modules_to_save." not in pname:
                    param.requires_grad_(True)
        elif bias.endswith("_only"):  # "lora_only", "oft_only"...: the biases of this adapter's layers
            for module in modules:
                if isinstance(module, AdapterLayer) and module.has_adapter(name) and module.bias is not None:
                    module.bias.requires_grad_(True)


def settle_new_adapter(model: nn.Module, adapter_name: str) -> None:
    """Freeze, and match to the model's train/eval mode, the tensors and modules of an adapter that
    was just added and is not active — touching that adapter only, so adding the 100th adapter
    costs what adding the 2nd did. (Everything else is already as ``set_trainable`` left it.)"""
    for _, module in walk_modules(model):
        if isinstance(module, AdapterLayer) and module.has_adapter(adapter_name):
            for param in module.adapter_parameters(adapter_name):
                param.requires_grad_(False)
            for item in module.adapter_modules(adapter_name):
                item.train(module.training)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            module.modules_to_save[adapter_name].requires_grad_(False).train(module.training)


def replace_with_base(model: nn.Module, keep_trained_copies: bool) -> nn.Module:
    """Swap every adapter layer back for its base layer (merge first if that is wanted), and every
    ``modules_to_save`` wrapper for its active trained copy or, without ``keep_trained_copies``,
    for the original module. Adapter layers go first: a wrapper's swap changes the paths below it."""
    for path, module in [(p, m) for p, m in walk_modules(model) if isinstance(m, AdapterLayer)]:
        _set_module(model, path, base_of(module))
    for path, module in [(p, m) for p, m in walk_modules(model) if isinstance(m, ModulesToSaveWrapper)]:
        active = module.active_adapter
        keep = keep_trained_copies and active is not None
        _set_module(model, path, module.modules_to_save[active] if keep else module.original_module)
    return model
