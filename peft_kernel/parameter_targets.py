"""Parameter targets: which ``nn.Parameter``s a config's ``target_parameters`` names, and the
adapter layers that adapt them (see :mod:`peft_kernel.parameter_layer`).

HF PEFT's rules: an entry names a parameter by its full dotted name (``model.layers.0.mlp.experts.
down_proj``) or a suffix of it after a dot (``experts.down_proj``); only parameters registered
directly on a module count (no buffers, no module names); ``exclude_modules`` and
``layers_to_transform`` do not apply; several parameters of one module nest in parameter order;
every adapter of a model with parameter targets targets the same parameters.
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from peft_kernel.errors import TargetNotFoundError
from peft_kernel.layer import AdapterLayer
from peft_kernel.targeting import base_of, candidate_modules


def target_parameter_names(config: Any) -> list[str]:
    """The config's ``target_parameters`` (empty when it has none)."""
    return list(getattr(config, "target_parameters", None) or [])


def _parameter_layers(module: nn.Module) -> dict[str, AdapterLayer]:
    """``{parameter name: layer}`` of the parameter layers in ``module``'s chain of adapter layers."""
    found: dict[str, AdapterLayer] = {}
    while isinstance(module, AdapterLayer):
        if module.parameter_name:
            found[module.parameter_name] = module
        module = module.base_layer
    return found


def _wraps_forward(module: nn.Module) -> bool:
    """Whether ``module``'s chain holds an adapter layer of a module target (one that wraps its forward)."""
    while isinstance(module, AdapterLayer):
        if not module.parameter_name:
            return True
        module = module.base_layer
    return False


def match_parameters(config: Any, model: nn.Module) -> list[tuple[str, str]]:
    """``(module path, parameter name)`` of every parameter ``config.target_parameters`` names, in
    module order and, within a module, in the order its parameters were registered."""
    wanted = target_parameter_names(config)
    if not wanted:
        return []
    matched = []
    for path, module in candidate_modules(model):
        for name, param in base_of(module)._parameters.items():
            full = f"{path}.{name}"
            if param is not None and any(full == t or full.endswith("." + t) for t in wanted):
                matched.append((path, name))
    return matched


def no_match_error(config: Any, model: nn.Module) -> TargetNotFoundError:
    """HF PEFT's error when neither ``target_modules`` nor ``target_parameters`` found anything,
    with parameter names close to the requested ones."""
    leaves = sorted({name for _, module in candidate_modules(model) for name in base_of(module)._parameters})
    close = sorted({c for t in target_parameter_names(config)
                    for c in difflib.get_close_matches(t.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.5)})
    hint = f" Close parameter names: {close}." if close else ""
    return TargetNotFoundError(
        "No `target_modules` passed but also no `target_parameters` found. Please check the values for these "
        f"arguments. {type(config).__name__}.target_parameters={target_parameter_names(config)} names no parameter "
        f"of {type(model).__name__} (an entry is a parameter's full name or a suffix of it after a dot, e.g. "
        f"'experts.down_proj'; buffers and module names do not count).{hint}"
    )


def check_same_parameters(config: Any, existing: dict[str, Any]) -> None:
    """HF PEFT's rule: every adapter of a model that has ``target_parameters`` targets the same ones."""
    new = sorted(target_parameter_names(config))
    for name, other in existing.items():
        old = sorted(target_parameter_names(other))
        if new and old and new != old:  # HF PEFT: adapters without parameter targets are not compared
            raise ValueError(
                "When using multiple adapters with `target_parameters`, all adapters must target the same set of "
                f"parameters, but got {new} for the new adapter and {old} for adapter {name!r}."
            )


def build_parameter_layers(model: nn.Module, config: Any, adapter_name: str, registry: Any, peft_type: str,
                           targets: list[tuple[str, str]], module_targets: set[str]
                           ) -> tuple[dict[str, AdapterLayer], list[AdapterLayer]]:
    """The adapter on every parameter in ``targets``: ``({module path: new outermost layer}, [layers
    that already adapted a parameter and got the adapter added])``. Nothing in the model is swapped
    here; on failure the adapter is taken out of the updated layers again."""
    by_module: dict[str, list[str]] = {}
    for path, name in targets:
        by_module.setdefault(path, []).append(name)
    new_layers: dict[str, AdapterLayer] = {}
    updated: list[AdapterLayer] = []
    try:
        for path, names in by_module.items():
            module = model.get_submodule(path)
            if path in module_targets or _wraps_forward(module):
                raise ValueError(
                    f"Trying to wrap an `nn.Parameter` of layer {path!r} of type {type(base_of(module)).__name__}, which "
                    "is not a valid target. Make sure that this layer is not also targeted with `target_modules`. For "
                    "some models, PEFT will do this automatically, try setting `target_modules=[]` to prevent it."
                )
            existing, top = _parameter_layers(module), module
            for name in names:
                if name in existing:
                    existing[name].update_layer(adapter_name, config, module_name=f"{path}.{name}")
                    updated.append(existing[name])
                    continue
                layer = registry.create_parameter_layer(config, adapter_name, top, path, name)
                if layer is None:
                    raise TargetNotFoundError(
                        f"parameter {path}.{name} matched target_parameters, but no installed plugin can adapt it "
                        f"with a {peft_type} adapter (none implements peft_kernel_create_parameter_layer for it)."
                    )
                layer.peft_type = peft_type
                top = layer
            if top is not module:
                new_layers[path] = top
    except BaseException:
        for layer in updated:
            layer.delete_adapter(adapter_name)
        raise
    return new_layers, updated


def targeted_parameter_names(model: nn.Module, adapter_name: str) -> list[str]:
    """``<module path>.<parameter>`` of every parameter ``adapter_name`` adapts (HF PEFT's
    ``targeted_parameter_names``), inner (earlier) parameters of a module first."""
    names: list[str] = []
    for path, module in candidate_modules(model):
        layers = [layer for layer in _parameter_layers(module).values() if layer.has_adapter(adapter_name)]
        names.extend(f"{path}.{layer.parameter_name}" for layer in reversed(layers))
    return names


def parameter_layers_of(model: nn.Module, adapter_name: str) -> list[AdapterLayer]:
    """Every parameter layer in ``model`` that holds ``adapter_name``."""
    return [layer for _, module in candidate_modules(model) for layer in _parameter_layers(module).values()
            if layer.has_adapter(adapter_name)]
