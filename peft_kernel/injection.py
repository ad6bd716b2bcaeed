"""Putting an adapter into a model: match targets, create or update layers, all or nothing.

Every layer for the new adapter is built before any module is swapped, so an unsupported layer,
a shape problem or a plugin error leaves the model exactly as it was.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from peft_kernel import parameter_targets
from peft_kernel.containers import BufferDict
from peft_kernel.errors import AdapterNameError, TargetNotFoundError
from peft_kernel.layer import AdapterLayer, walk_modules
from peft_kernel.modules_to_save import ModulesToSaveWrapper
from peft_kernel.plugins import Registry, get_registry
from peft_kernel.transaction import guarding_base_weights
from peft_kernel.targeting import (
    base_of,
    candidate_modules,
    check_targets_resolved,
    compress_target_modules,
    expand_target_modules,
    no_match_error,
)

CONFIGS_ATTR = "_peft_kernel_configs"
"""Where ``inject_adapter_in_model`` keeps a bare model's ``{adapter_name: config}``."""

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


def inject(
    model: nn.Module,
    config: Any,
    adapter_name: str,
    registry: Registry | None = None,
    state_dict_keys: Any = None,
    stack: bool = False,
) -> list[str]:
    """Add ``adapter_name`` built from ``config`` to ``model``; return the targeted module paths.

    With ``stack`` (mixed models), a module already wrapped by an adapter layer of another method
    gets the adapter in the layer of this method further down its chain of ``base_layer``s, or else
    a new layer of this method wrapping the existing one (see :func:`_build_layers`).

    With ``state_dict_keys`` (the keys of a state dict, as HF PEFT's ``state_dict=`` argument), the
    modules to adapt are those the keys name (``<module>.<prefix>...``) instead of the config's
    targets; a difference from what the config would target is reported with a warning, as HF does."""
    registry = registry or get_registry()
    record = registry.method_for_config(config)
    expand_target_modules(config, model, record)
    registry.prepare_config(config, model)
    check_targets_resolved(config, model)

    def by_config(name: str, module: nn.Module) -> bool:
        return registry.match_target(config, name, module, model)

    candidates = [(n, m) for n, m in candidate_modules(model) if not isinstance(m, ModulesToSaveWrapper)]
    parameters = parameter_targets.match_parameters(config, model)
    if state_dict_keys is None:
        matched = [(name, module) for name, module in candidates if by_config(name, module)]
    else:
        wanted = {key.rsplit("." + record.prefix, 1)[0].removeprefix("_orig_mod.") for key in state_dict_keys
                  if "." + record.prefix in key}
        wanted -= {path for path, _ in parameters}  # parameter targets come from the config (HF: from it only)
        matched = [(name, module) for name, module in candidates if name in wanted]
        _warn_state_dict_targets(
            {name for name, module in candidates if by_config(name, module)}, {name for name, _ in matched}
        )
    saved_whole = [name for name, _ in candidate_modules(model) if _matches(getattr(config, "modules_to_save", None) or (), name)]
    # modules_to_save take precedence (HF PEFT's rule): nothing inside a module saved whole gets an adapter
    matched = [(name, m) for name, m in matched if not any(name == w or name.startswith(w + ".") for w in saved_whole)]
    if not matched and not parameters:
        raise parameter_targets.no_match_error(config, model) if parameter_targets.target_parameter_names(config) \
            else no_match_error(config, model)
    compress_target_modules(config, model, [name for name, _ in matched])
    shared = registry.create_shared_tensors(config, adapter_name, matched)
    with guarding_base_weights() as guard:  # an initialisation that rewrites base weights is undone on failure
        guard.save(config, [module for _, module in matched])
        param_layers, updated = parameter_targets.build_parameter_layers(
            model, config, adapter_name, registry, record.peft_type, parameters, {name for name, _ in matched})
        try:
            new_layers = _build_layers(matched, config, adapter_name, record, registry, stack, shared)
        except BaseException:
            for layer in updated:
                layer.delete_adapter(adapter_name)
            raise
    for name, layer in (*new_layers.items(), *param_layers.items()):
        _set_module(model, name, layer)
    for name, module in matched:
        match_base_dtype(_holder(new_layers.get(name, module), adapter_name), adapter_name)
    for layer in parameter_targets.parameter_layers_of(model, adapter_name):
        match_base_dtype(layer, adapter_name)
    wrap_modules_to_save(model, getattr(config, "modules_to_save", None), adapter_name)
    registry.adapter_injected(config, model, adapter_name)
    return [name for name, _ in matched]


def _holder(module: nn.Module, adapter_name: str) -> nn.Module:
    """The adapter layer in ``module``'s chain of stacked layers that holds ``adapter_name``."""
    layer = module
    while isinstance(layer, AdapterLayer):
        if layer.has_adapter(adapter_name):
            return layer
        layer = layer.base_layer
    return module


def _same_method_layer(module: nn.Module, peft_type: str) -> AdapterLayer | None:
    """In a chain of stacked adapter layers (mixed models), the one of ``peft_type``, if any."""
    layer = module
    while isinstance(layer, AdapterLayer):
        if not layer.peft_type or layer.peft_type == peft_type:
            return layer
        layer = layer.base_layer
    return None


def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


def _build_layers(matched: list[tuple[str, nn.Module]], config: Any, adapter_name: str, record: Any, registry: Registry,
                  stack: bool = False, shared: dict[str, torch.Tensor] | None = None) -> dict[str, AdapterLayer]:
    """New adapter layers for the unwrapped modules, and the adapter added to already-wrapped ones;
    on failure the adapter is taken out of the wrapped ones again (the model itself is not touched).
    ``shared`` (the adapter's model-level tensors) goes to every layer that gets the adapter.

    With ``stack`` a wrapped module whose chain has no layer of this method gets a new layer built
    for the innermost (plain) module, whose ``base_layer`` then becomes the existing adapter layer:
    its forward runs the layers below, and merges reach the plain module's weight through them."""
    new_layers: dict[str, AdapterLayer] = {}
    for name, module in matched:
        if isinstance(module, AdapterLayer):
            if stack and _same_method_layer(module, record.peft_type) is None:
                layer = registry.create_layer(config, adapter_name, _innermost(module), name, shared)
                if layer is None:
                    raise TargetNotFoundError(
                        f"module {name!r} of type {type(_innermost(module)).__name__} matched target_modules, but no "
                        f"installed plugin can wrap it with a {record.peft_type} adapter."
                    )
                layer.peft_type = record.peft_type
                layer.base_layer = module
                new_layers[name] = layer
                continue
            if module.peft_type and module.peft_type != record.peft_type and not stack:
                raise TargetNotFoundError(
                    f"module {name!r} already holds a {module.peft_type} adapter; one model mixes no adapter "
                    f"types, so a {record.peft_type} adapter cannot be added to it (use get_peft_model(..., "
                    "mixed=True) / PeftMixedModel to mix methods)."
                )
            continue
        layer = registry.create_layer(config, adapter_name, module, name, shared)
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
            if isinstance(module, AdapterLayer) and name not in new_layers:
                own = _same_method_layer(module, record.peft_type) if stack else module
                own.update_layer(adapter_name, config, module_name=name, **({"shared": shared} if shared else {}))
                updated.append(own)
    except BaseException:
        for layer in updated:
            layer.delete_adapter(adapter_name)
        raise
    return new_layers


# ---- adapter dtypes (HF PEFT's rule) ------------------------------------------------------------
# A new adapter's tensors first take the float dtype of the layer they adapt (so on a bf16 base they
# hold bf16-representable values, as in HF PEFT); ``cast_adapter_dtype`` then upcasts half and
# 8-bit floats to float32 when ``autocast_adapter_dtype=True`` (``PeftModel`` and its add/load).
# ``inject_adapter_in_model`` does not upcast, as HF PEFT does not.

_UPCAST = tuple(
    dtype for dtype in (torch.float16, torch.bfloat16, *(getattr(torch, n, None) for n in (
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")))
    if dtype is not None
)


def _base_float_dtype(layer: AdapterLayer) -> torch.dtype | None:
    base = base_of(layer)
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor):
        weight = next(base.parameters(), None)
    if weight is None or not weight.is_floating_point():
        return None  # a quantized (integer) base: adapters keep the dtype the plugin chose
    return weight.dtype


def _adapter_tensors(layer: AdapterLayer, adapter_name: str) -> list[torch.Tensor]:
    """Every parameter and buffer of ``adapter_name`` in ``layer``'s per-adapter containers."""
    tensors: list[torch.Tensor] = []
    for attr in (*layer.adapter_layer_names, *layer.other_param_names):
        container = getattr(layer, attr, None)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict, BufferDict)) and adapter_name in container:
            item = container[adapter_name]
            if isinstance(item, torch.Tensor):
                tensors.append(item)
            else:
                tensors.extend([*item.parameters(), *item.buffers()])
    return tensors


def match_base_dtype(layer: AdapterLayer, adapter_name: str) -> None:
    """Give ``adapter_name``'s float tensors in ``layer`` the float dtype of the base layer."""
    dtype = _base_float_dtype(layer)
    if dtype is None:
        return
    for tensor in _adapter_tensors(layer, adapter_name):
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)


def cast_adapter_dtype(model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """HF PEFT's ``autocast_adapter_dtype``: upcast ``adapter_name``'s float16 / bfloat16 / float8
    tensors to float32 (stable training on a half-precision base); nothing when it is False."""
    if not autocast_adapter_dtype:
        return
    for _, module in walk_modules(model):
        if isinstance(module, AdapterLayer) and module.has_adapter(adapter_name):
            for tensor in _adapter_tensors(module, adapter_name):
                if tensor.dtype in _UPCAST:
                    tensor.data = tensor.data.to(torch.float32)


def _warn_state_dict_targets(from_config: set[str], from_state_dict: set[str]) -> None:
    only_config, only_state = from_config - from_state_dict, from_state_dict - from_config
    if not (only_config or only_state):
        return
    message = ("While injecting the PEFT adapters, an inconsistency was discovered between the PEFT config and "
               "the provided state_dict. This is not necessarily an issue and can be ignored if this was the "
               "intent. ")
    if only_config:
        message += f"The PEFT config contained these additional target modules: {sorted(only_config)}. "
    if only_state:
        message += f"The state_dict contained these additional target modules: {sorted(only_state)}. "
    warnings.warn(message, stacklevel=3)


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


def set_trainable(model: nn.Module, active: list[str], configs: dict[str, Any], inference_mode: bool | None = None) -> None:
    """Freeze everything but the active adapters (and the biases their configs ask for). The
    active adapters are frozen too where ``inference_mode`` is True or, when it is None, where
    their config's ``inference_mode`` is.

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
        frozen = getattr(config, "inference_mode", False) if inference_mode is None else inference_mode
        if frozen:
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


def set_requires_grad(model: nn.Module, adapter_names: list[str], requires_grad: bool = True) -> None:
    """HF PEFT's ``set_requires_grad``: gradients on or off for the named adapters' tensors in every
    adapter layer and ``modules_to_save`` copy; nothing else changes."""
    for _, module in walk_modules(model):
        if isinstance(module, AdapterLayer):
            for name in adapter_names:
                for param in module.adapter_parameters(name):
                    param.requires_grad_(requires_grad)
        elif isinstance(module, ModulesToSaveWrapper):
            for name in adapter_names:
                if name in module.modules_to_save:
                    module.modules_to_save[name].requires_grad_(requires_grad)


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
    layers = [(p, m) for p, m in walk_modules(model) if isinstance(m, AdapterLayer)]
    stacked = {id(m.base_layer) for _, m in layers}  # layers below another (mixed models) go with it
    for path, module in layers:
        if id(module) not in stacked:
            _set_module(model, path, _innermost(module))
    for path, module in [(p, m) for p, m in walk_modules(model) if isinstance(m, ModulesToSaveWrapper)]:
        active = module.active_adapter
        keep = keep_trained_copies and active is not None
        _set_module(model, path, module.modules_to_save[active] if keep else module.original_module)
    return model
