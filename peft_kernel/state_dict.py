"""In-memory adapter tensors <-> HF PEFT's on-disk keys.

The on-disk key of a tensor is its in-memory key with the ``.<adapter>`` segment removed
(``q_proj.lora_A.default.weight`` -> ``q_proj.lora_A.weight``); ``modules_to_save`` copies are
saved under the plain module key; ``bias="all"`` / ``"<method>_only"`` biases under their own key.
The map is derived from the model itself, so every method and layer type gets it for free.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from peft_kernel.errors import CheckpointError
from peft_kernel.layer import AdapterLayer, walk_modules
from peft_kernel.modules_to_save import ModulesToSaveWrapper


class LoadResult(NamedTuple):
    """What ``set_peft_model_state_dict`` did not fill and what it could not place."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _root_and_configs(model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    configs = getattr(model, "peft_config", None)
    if configs is None:
        configs = getattr(model, "_peft_kernel_configs", {})
    return model, configs


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``{on-disk key: live tensor}`` for every tensor that belongs to ``adapter_name``."""
    root, configs = _root_and_configs(model)
    config = configs.get(adapter_name)
    bias_mode = getattr(config, "bias", "none")
    out: dict[str, torch.Tensor] = {}
    layer_paths: dict[str, str] = {}
    for path, module in walk_modules(root):
        if isinstance(module, AdapterLayer):
            # a layer stacked under another (mixed models: ``lin.base_layer``) saves under the outer
            # layer's path, so every adapter keeps its single-method on-disk keys
            parent, _, last = path.rpartition(".")
            layer_paths[path] = layer_paths[parent] if last == "base_layer" and parent in layer_paths else path
            path = layer_paths[path]
            for attr in module.adapter_layer_names:
                container = getattr(module, attr)
                if adapter_name not in container:
                    continue
                item = container[adapter_name]
                if isinstance(item, nn.Parameter):
                    out[_join(path, attr)] = item
                else:
                    for name, tensor in item.state_dict(keep_vars=True).items():
                        out[_join(path, attr, name)] = tensor
            if str(bias_mode).endswith("_only") and module.has_adapter(adapter_name) and module.bias is not None:
                out[_join(path, "base_layer.bias")] = module.bias
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for name, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[_join(path, name)] = tensor
    if bias_mode == "all":
        taken = {id(t) for t in out.values()}
        for name, param in root.named_parameters():
            if name.endswith("bias") and ".modules_to_save." not in name and id(param) not in taken:
                out.setdefault(name, param)
    return out


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
"""With ``save_embedding_layers="auto"``, targeting a module of these names saves the embedding
layers' full weights with the adapter (HF PEFT's rule: a LoRA on resized embeddings needs them)."""


def embedding_tensors(model: nn.Module, wrapped_only: bool) -> dict[str, torch.Tensor]:
    """The input and output embedding layers' own tensors (``<path>.base_layer.weight`` when wrapped
    by an adapter; with ``wrapped_only`` the unwrapped ones are left out, as HF PEFT does when the
    embeddings are among the targets)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    wanted = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(base, getter)() if hasattr(base, getter) else None
        if layer is not None:
            wanted.add(id(layer))
    out: dict[str, torch.Tensor] = {}
    for path, module in walk_modules(model):
        if id(module) in wanted and (isinstance(module, AdapterLayer) or not wrapped_only):
            inner, prefix = (module.base_layer, f"{path}.base_layer") if isinstance(module, AdapterLayer) else (module, path)
            out.update({f"{prefix}.{name}": t for name, t in inner.state_dict(keep_vars=True).items()})
    return out


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: str | bool = "auto",
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under HF PEFT's on-disk keys (what ``adapter_model.safetensors`` holds).

    Keys are relative to ``model``: ``base_model.model.<module>...`` for a ``PeftModel``, plain module
    paths for a model returned by ``inject_adapter_in_model``.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    prompt = getattr(model, "_prompt", None)
    if prompt is not None:  # virtual-token methods keep their tensors in the prompt learner
        return prompt.saved_tensors(adapter_name)
    tensors = adapter_tensors(model, adapter_name)
    config = _root_and_configs(model)[1].get(adapter_name)
    targets = getattr(config, "target_modules", None) or ()
    embeddings_targeted = any(name in targets for name in EMBEDDING_LAYER_NAMES)
    if save_embedding_layers == "auto":
        save_embedding_layers = embeddings_targeted
    if save_embedding_layers:
        tensors.update(embedding_tensors(model, wrapped_only=embeddings_targeted))
    if state_dict is not None:
        live = {id(t): k for k, t in tensors.items()}
        by_key = {k: v for k, v in model.state_dict(keep_vars=True).items()}
        tensors = {live[id(v)]: state_dict[k] for k, v in by_key.items() if id(v) in live and k in state_dict}
    return {k: v.detach() for k, v in tensors.items()}


def hf_trained_copy_duplicates(model: nn.Module, keys: Any) -> set[str]:
    """The keys among ``keys`` that are HF PEFT's redundant copies of ``modules_to_save`` biases.

    With ``bias="all"`` HF PEFT saves every ``*.bias`` of the model, its adapter's trained copy of a
    saved module included, under the key its adapter-name stripping leaves: ``<head>.modules_to_save.bias``
    for a one-layer head, ``<head>.modules_to_save.<adapter>.<sub>.bias`` for a deeper one. The same
    tensor is also saved under the plain key ``<head>.bias``, which is what HF PEFT loads: the duplicate
    lands nowhere there (or is overwritten by the plain key's value), so it is skipped here too. Our
    own checkpoints do not write it.
    """
    found: set[str] = set()
    for path, module in walk_modules(model):
        if not isinstance(module, ModulesToSaveWrapper):
            continue
        head = _join(path, "modules_to_save") + "."
        own = set(module.original_module.state_dict())
        for key in keys:
            if key.startswith(head):
                rest = key[len(head):]
                if rest in own or rest.partition(".")[2] in own:
                    found.add(key)
    return found


def _warn_about_values(state_dict: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> None:
    """Loading casts every tensor to its parameter's dtype; say so when that is lossy or suspicious."""
    import warnings

    cast = [f"{k} ({v.dtype})" for k, v in state_dict.items()
            if k in targets and (not v.is_floating_point() or v.is_complex()) and targets[k].is_floating_point()]
    if cast:
        warnings.warn(f"checkpoint tensors that are not real floats are cast to the adapter's float dtype: {cast[:8]}",
                      stacklevel=3)
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())]
    if bad:
        warnings.warn(f"checkpoint tensors hold NaN or infinite values: {bad[:8]}; the adapter's outputs will be too.",
                      stacklevel=3)


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Copy on-disk-keyed tensors into the adapter ``adapter_name``.

    Keys that match no tensor of the adapter, and tensors whose shape does not fit, raise
    :class:`CheckpointError` naming them (nothing is copied then). Returns an object with
    ``missing_keys`` and ``unexpected_keys`` like ``nn.Module.load_state_dict``; the unexpected keys
    are HF PEFT's redundant ``modules_to_save`` bias copies (:func:`hf_trained_copy_duplicates`),
    skipped as HF PEFT skips them.
    """
    from peft_kernel.plugins import get_registry

    prompt = getattr(model, "_prompt", None)
    if prompt is not None:
        return prompt.load_tensors(peft_model_state_dict, adapter_name)
    _, configs = _root_and_configs(model)
    config = configs.get(adapter_name)
    if config is not None:
        peft_model_state_dict = get_registry().map_state_dict(config, dict(peft_model_state_dict), "load")
    targets = adapter_tensors(model, adapter_name)
    ignored = hf_trained_copy_duplicates(model, peft_model_state_dict)
    if ignored:
        peft_model_state_dict = {k: v for k, v in peft_model_state_dict.items() if k not in ignored}
    adapter_keys = set(targets)
    unexpected = sorted(k for k in peft_model_state_dict if k not in targets)
    if unexpected:  # keys of the model's own tensors (embedding layers saved with the adapter) load too, as in HF
        own = dict(model.state_dict(keep_vars=True))
        targets.update({k: own[k] for k in unexpected if k in own})
        unexpected = [k for k in unexpected if k not in own]
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} checkpoint key(s) match no tensor of adapter {adapter_name!r} in "
            f"{type(model).__name__}: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. "
            "Was the adapter trained on another base model or with other target_modules? "
            f"Expected keys look like: {sorted(targets)[:4]}"
        )
    if adapter_keys and not any(k in adapter_keys for k in peft_model_state_dict):
        raise CheckpointError(
            f"none of the {len(peft_model_state_dict)} checkpoint key(s) belongs to adapter {adapter_name!r} of "
            f"{type(model).__name__} (checkpoint: {sorted(peft_model_state_dict)[:4]}; expected keys look like "
            f"{sorted(targets)[:4]}). Is it an adapter of another method or for another model?"
        )
    _warn_about_values(peft_model_state_dict, targets)
    mismatched = []
    for key, value in peft_model_state_dict.items():
        if tuple(value.shape) != tuple(targets[key].shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(targets[key].shape)}")
    if mismatched and not ignore_mismatched_sizes:
        raise CheckpointError(
            "checkpoint tensors do not fit the model (is it for another base model, or another rank?): "
            + "; ".join(mismatched[:8])
        )
    with torch.no_grad():
        for key, value in peft_model_state_dict.items():
            if tuple(value.shape) == tuple(targets[key].shape):
                targets[key].copy_(value.to(device=targets[key].device, dtype=targets[key].dtype))
    missing = sorted(k for k in targets if k not in peft_model_state_dict)
    return LoadResult(missing, sorted(ignored))
