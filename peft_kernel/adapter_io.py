"""Adapter I/O: the one route between a model's adapters and HF PEFT's checkpoints.

Everything that saves or loads adapter tensors goes through here: ``PeftModel.save_pretrained``
(:func:`save_adapter`), ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` (which
``load_adapter`` / ``from_pretrained`` and the Trainer integration use), :func:`hotswap_adapter`,
the mixed model's save and the load transactions' snapshots. A ``PeftModel``'s tensors come from
and go to its host (:class:`~peft_kernel.host.AdapterHost`); a model from
``inject_adapter_in_model`` is walked directly. The method plugins' ``peft_kernel_map_state_dict``
runs in exactly two places: :func:`get_peft_model_state_dict` (``"save"``, also what
``save_pretrained`` writes) and :func:`set_peft_model_state_dict` (``"load"``), so the two are
symmetric: ``set`` takes exactly what ``get`` returns. :mod:`peft_kernel.checkpoint` keeps the file
primitives (atomic writes, readers, Hub resolution).

The on-disk key of a layer adapter's tensor is its in-memory key with the ``.<adapter>`` segment
removed (``q_proj.lora_A.default.weight`` -> ``q_proj.lora_A.weight``); ``modules_to_save`` copies
are saved under the plain module key; ``bias="all"`` / ``"<method>_only"`` biases under their own
key. The map is derived from the model itself, so every method and layer type gets it for free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from peft_kernel.checkpoint import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, atomic_save_tensors, load_adapter_weights, own_storage
from peft_kernel.config import PeftConfig
from peft_kernel.errors import CheckpointError
from peft_kernel.layer import AdapterLayer, adapter_layers, walk_modules
from peft_kernel.modules_to_save import ModulesToSaveWrapper
from peft_kernel.plugins import get_registry

HOST_KEY_PREFIX = "base_model"
"""Where a tuner host sits in its ``PeftModel``: its tensors' keys start with this segment."""


class LoadResult(NamedTuple):
    """What ``set_peft_model_state_dict`` did not fill and what it could not place."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _configs(model: nn.Module) -> dict[str, Any]:
    configs = getattr(model, "peft_config", None)
    if configs is None:
        configs = getattr(model, "_peft_kernel_configs", {})
    return configs


def _host_of(model: nn.Module) -> Any:
    """The adapter host of a ``PeftModel`` (``None`` for a model with injected adapters)."""
    return vars(model).get("_host")


def _walk(root: nn.Module, prefix: str) -> Any:
    for path, module in walk_modules(root):
        yield _join(prefix, path), module


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _dotted(prefix: str) -> str:
    return f"{prefix}." if prefix else ""


def adapter_tensors(root: nn.Module, adapter_name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{on-disk key: live tensor}`` for every tensor of ``root``'s layers and ``modules_to_save``
    copies that belongs to ``adapter_name`` (keys start with ``prefix``)."""
    config = _configs(root).get(adapter_name)
    bias_mode = getattr(config, "bias", "none")
    out: dict[str, torch.Tensor] = {}
    layer_paths: dict[str, str] = {}
    for path, module in _walk(root, prefix):
        if isinstance(module, AdapterLayer):
            # a layer stacked under another (mixed models: ``lin.base_layer``) saves under the outer
            # layer's path, so every adapter keeps its single-method on-disk keys; nested parameter layers
            # (several parameters of one module) keep their own paths, as in HF PEFT
            parent, _, last = path.rpartition(".")
            stacked = last == "base_layer" and parent in layer_paths and not module.parameter_name
            layer_paths[path] = layer_paths[parent] if stacked else path
            path = layer_paths[path]
            for attr in module.adapter_layer_names:
                container = getattr(module, attr)
                if adapter_name not in container:
                    continue
                item = container[adapter_name]
                if attr in module.shared_tensor_names:  # one tensor of the whole adapter: saved once, at the host
                    out.setdefault(_join(prefix, attr), item)
                elif isinstance(item, torch.Tensor):  # a parameter or a buffer
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
        for name, param in root.named_parameters(prefix=prefix):
            if name.endswith("bias") and ".modules_to_save." not in name and id(param) not in taken:
                out.setdefault(name, param)
    return out


def tie_shared_tensors(root: nn.Module, adapter_name: str) -> None:
    """Give every layer's entry of a shared container (``shared_tensor_names``) the value of the first
    layer's, which is the one :func:`adapter_tensors` names: the entries are one tensor until
    ``.to()`` / ``.half()`` give each layer its own copy of a buffer, and a load must reach them all."""
    first: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _, layer in adapter_layers(root):
            for attr in layer.shared_tensor_names:
                container = getattr(layer, attr)
                if adapter_name not in container:
                    continue
                tensor = container[adapter_name]
                source = first.setdefault(attr, tensor)
                if tensor is not source and tensor.shape == source.shape:
                    tensor.copy_(source.to(device=tensor.device, dtype=tensor.dtype))


def unsaved_shared_keys(root: nn.Module, adapter_name: str, prefix: str = "") -> set[str]:
    """Keys of ``adapter_name``'s shared tensors that its method leaves out of checkpoints on purpose
    (dropped by ``peft_kernel_map_state_dict(direction="save")``, as VeRA's ``save_projection=False``):
    a load does not miss them, the method rebuilt them when the adapter was created."""
    config = _configs(root).get(adapter_name)
    shared = {_join(prefix, attr): container[adapter_name] for _, layer in adapter_layers(root)
              for attr in layer.shared_tensor_names
              if adapter_name in (container := getattr(layer, attr))}
    if config is None or not shared:
        return set()
    return set(shared) - set(_to_disk(config, dict(shared)))


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
"""With ``save_embedding_layers="auto"``, targeting a module of these names saves the embedding
layers' full weights with the adapter (HF PEFT's rule: a LoRA on resized embeddings needs them)."""


def embedding_tensors(root: nn.Module, base: nn.Module, wrapped_only: bool, prefix: str = "") -> dict[str, torch.Tensor]:
    """The input and output embedding layers' own tensors of ``base`` (the plain model inside
    ``root``) (``<path>.base_layer.weight`` when wrapped by an adapter; with ``wrapped_only`` the
    unwrapped ones are left out, as HF PEFT does when the embeddings are among the targets)."""
    wanted = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(base, getter)() if hasattr(base, getter) else None
        if layer is not None:
            wanted.add(id(layer))
    out: dict[str, torch.Tensor] = {}
    for path, module in _walk(root, prefix):
        if id(module) in wanted and (isinstance(module, AdapterLayer) or not wrapped_only):
            inner, at = (module.base_layer, f"{path}.base_layer") if isinstance(module, AdapterLayer) else (module, path)
            out.update({f"{at}.{name}": t for name, t in inner.state_dict(keep_vars=True).items()})
    return out


def layer_state_dict(
    root: nn.Module,
    adapter_name: str,
    state_dict: dict[str, torch.Tensor] | None = None,
    save_embedding_layers: str | bool = "auto",
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """The tensors saved for ``adapter_name`` of a model with adapter layers (a tuner host, or a
    model from ``inject_adapter_in_model``), detached, keys starting with ``prefix``.

    ``state_dict`` (keys as ``root``'s own, with ``prefix``) supplies the values instead of the
    live tensors, filtered to the adapter's keys as HF PEFT does."""
    tensors = adapter_tensors(root, adapter_name, prefix)
    config = _configs(root).get(adapter_name)
    targets = getattr(config, "target_modules", None) or ()
    embeddings_targeted = any(name in targets for name in EMBEDDING_LAYER_NAMES)
    if save_embedding_layers == "auto":
        save_embedding_layers = embeddings_targeted
    if save_embedding_layers:
        base = getattr(root, "plain_model", root)
        tensors.update(embedding_tensors(root, base, wrapped_only=embeddings_targeted, prefix=prefix))
    if state_dict is not None:
        live = {id(t): k for k, t in tensors.items()}
        by_key = {k: v for k, v in root.state_dict(keep_vars=True, prefix=_dotted(prefix)).items()}
        tensors = {live[id(v)]: state_dict[k] for k, v in by_key.items() if id(v) in live and k in state_dict}
    return {k: v.detach() for k, v in tensors.items()}


def adapter_state_dict(
    model: nn.Module,
    adapter_name: str = "default",
    state_dict: dict[str, torch.Tensor] | None = None,
    save_embedding_layers: str | bool = "auto",
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under on-disk keys, before ``peft_kernel_map_state_dict``: from the
    host of a ``PeftModel``, else from ``model``'s layers."""
    host = _host_of(model)
    if host is not None:
        return host.saved_tensors(adapter_name, state_dict=state_dict, save_embedding_layers=save_embedding_layers)
    return layer_state_dict(model, adapter_name, state_dict, save_embedding_layers)


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: str | bool = "auto",
) -> dict[str, torch.Tensor]:
    """The adapter's tensors exactly as ``save_pretrained`` writes them: HF PEFT's on-disk keys,
    after the method's ``peft_kernel_map_state_dict(direction="save")``.

    Keys are relative to ``model``: ``base_model.model.<module>...`` for a ``PeftModel``, plain module
    paths for a model returned by ``inject_adapter_in_model``.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    tensors = adapter_state_dict(model, adapter_name, state_dict, save_embedding_layers)
    config = _configs(model).get(adapter_name)
    tensors = tensors if config is None else _to_disk(config, tensors)
    # views into a larger block (a method's stacked storage) are copied: each returned tensor holds
    # its own values only, as the model's own parameters would
    return {k: own_storage(v) for k, v in tensors.items()}


def _to_disk(config: PeftConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one place adapter tensors are mapped for saving (``peft_kernel_map_state_dict``)."""
    return get_registry().map_state_dict(config, tensors, "save")


def _from_disk(config: PeftConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one place saved adapter tensors are mapped back for loading (``peft_kernel_map_state_dict``)."""
    return get_registry().map_state_dict(config, dict(tensors), "load")


def hf_trained_copy_duplicates(model: nn.Module, keys: Any, prefix: str = "") -> set[str]:
    """The keys among ``keys`` that are HF PEFT's redundant copies of ``modules_to_save`` biases.

    With ``bias="all"`` HF PEFT saves every ``*.bias`` of the model, its adapter's trained copy of a
    saved module included, under the key its adapter-name stripping leaves: ``<head>.modules_to_save.bias``
    for a one-layer head, ``<head>.modules_to_save.<adapter>.<sub>.bias`` for a deeper one. The same
    tensor is also saved under the plain key ``<head>.bias``, which is what HF PEFT loads: the duplicate
    lands nowhere there (or is overwritten by the plain key's value), so it is skipped here too. Our
    own checkpoints do not write it.
    """
    found: set[str] = set()
    for path, module in _walk(model, prefix):
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
    """Copy tensors as :func:`get_peft_model_state_dict` returns them (and ``save_pretrained`` writes
    them) into the adapter ``adapter_name``: the method's ``peft_kernel_map_state_dict(direction="load")``
    first, then :func:`load_adapter_state_dict`.

    Keys that match no tensor of the adapter, and tensors whose shape does not fit, raise
    :class:`CheckpointError` naming them (nothing is copied then). Returns an object with
    ``missing_keys`` and ``unexpected_keys`` like ``nn.Module.load_state_dict``; the unexpected keys
    are HF PEFT's redundant ``modules_to_save`` bias copies (:func:`hf_trained_copy_duplicates`),
    skipped as HF PEFT skips them.
    """
    config = _configs(model).get(adapter_name)
    if config is not None:
        peft_model_state_dict = _from_disk(config, peft_model_state_dict)
    return load_adapter_state_dict(model, peft_model_state_dict, adapter_name, ignore_mismatched_sizes)


def load_adapter_state_dict(
    model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str, ignore_mismatched_sizes: bool = False
) -> LoadResult:
    """Copy on-disk-keyed ``tensors`` (after ``peft_kernel_map_state_dict``) into ``adapter_name``:
    through the host of a ``PeftModel``, else into ``model``'s layers."""
    host = _host_of(model)
    if host is not None:
        return host.load_tensors(tensors, adapter_name, ignore_mismatched_sizes=ignore_mismatched_sizes)
    return load_layer_state_dict(model, tensors, adapter_name, ignore_mismatched_sizes)


def load_layer_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    ignore_mismatched_sizes: bool = False,
    prefix: str = "",
) -> LoadResult:
    """Copy on-disk-keyed tensors (keys starting with ``prefix``) into the layers and
    ``modules_to_save`` copies of ``adapter_name`` in ``model`` (a tuner host, or a model from
    ``inject_adapter_in_model``); the checks of :func:`set_peft_model_state_dict`."""
    targets = adapter_tensors(model, adapter_name, prefix)
    ignored = hf_trained_copy_duplicates(model, peft_model_state_dict, prefix)
    if ignored:
        peft_model_state_dict = {k: v for k, v in peft_model_state_dict.items() if k not in ignored}
    adapter_keys = set(targets)
    unexpected = sorted(k for k in peft_model_state_dict if k not in targets)
    if unexpected:  # keys of the model's own tensors (embedding layers saved with the adapter) load too, as in HF
        own = dict(model.state_dict(keep_vars=True, prefix=_dotted(prefix)))
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
    tie_shared_tensors(model, adapter_name)
    loaded = {id(targets[k]) for k in peft_model_state_dict}  # a tensor tied across layers loads through any of its keys
    missing = sorted(k for k in targets if k not in peft_model_state_dict and id(targets[k]) not in loaded
                     and k not in unsaved_shared_keys(model, adapter_name, prefix))
    return LoadResult(missing, sorted(ignored))


# ---- save_pretrained ------------------------------------------------------------------------------
def save_adapter(
    model: nn.Module,
    adapter_name: str,
    folder: Path,
    safe_serialization: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    save_embedding_layers: str | bool = "auto",
    initial: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``adapter_name`` of ``model`` (a ``PeftModel``) into ``folder`` in HF PEFT's format: the
    tensors :func:`get_peft_model_state_dict` returns and the config (:func:`saved_config`); a file
    of the other format left there by an earlier save is removed. With ``initial`` (the adapter's
    tensors saved right after a base-changing initialisation) the adapter is first converted to one
    for the original base model (``peft_kernel_convert_for_original_base``)."""
    registry = get_registry()
    config = model.peft_config[adapter_name]
    tensors = adapter_state_dict(model, adapter_name, state_dict, save_embedding_layers)
    if initial is not None:
        converted = registry.convert_for_original_base(config.copy(), dict(tensors), initial)
        if converted is None:
            tuner = registry.method_for_config(config).tuner_name or type(config).__name__
            raise ValueError(
                f"Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported for {tuner}."
            )
        tensors, config = converted
    mapped = _to_disk(config, tensors)
    weights_name, stale_name = (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME) if safe_serialization else (PICKLE_WEIGHTS_NAME, WEIGHTS_NAME)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(folder / weights_name, mapped, safe_serialization)
    (folder / stale_name).unlink(missing_ok=True)  # a previous save in the other format would shadow or confuse
    saved_config(model, config).save_pretrained(folder)


def saved_config(model: nn.Module, config: PeftConfig) -> PeftConfig:
    """The config written next to the tensors: inference mode, and HF PEFT's base-model fields."""
    saved = config.copy()
    saved.inference_mode = True
    base = model.get_base_model()
    if saved.base_model_name_or_path is None:
        saved.base_model_name_or_path = getattr(getattr(base, "config", None), "_name_or_path", None) or None
    if saved.task_type is None and saved.auto_mapping is None:
        saved.auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    return saved


# ---- hotswap --------------------------------------------------------------------------------------
PADDED_RANK_ATTR = "_peft_kernel_hotswap_rank"
"""Set on a model by ``prepare_model_for_compiled_hotswap`` (:mod:`peft_kernel.utils.hotswap`):
:func:`hotswap_adapter` then zero-pads adapters of a lower rank into the loaded ones' tensors."""


def _fits(new: torch.Tensor, target: torch.Tensor) -> bool:
    return new.dim() == target.dim() and all(a <= b for a, b in zip(new.shape, target.shape))


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | os.PathLike,
    adapter_name: str,
    torch_device: str | None = None,
    **kwargs: Any,
) -> None:
    """Swap the weights of loaded adapter ``adapter_name`` for those saved at ``model_name_or_path``,
    keeping modules (and compiled graphs). The new adapter must be of the same method and shapes
    (rank) and target the same modules. Values that are not tensors (LoRA's ``scaling``) are
    refreshed through the layer's ``hotswap_update``."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: swap in the model it compiled
    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder") if k in kwargs}
    config = PeftConfig.from_pretrained(model_name_or_path, **hub)
    if adapter_name not in model.peft_config:
        raise CheckpointError(f"hotswap needs a loaded adapter named {adapter_name!r}; loaded: {sorted(model.peft_config)}")
    old = model.peft_config[adapter_name]
    registry = get_registry()
    record = registry.method_for_config(config)
    if registry.method_for_config(old).peft_type != record.peft_type:
        raise CheckpointError(f"cannot hotswap a {old.peft_type} adapter for a {config.peft_type} one.")
    if not record.supports("hotswap"):
        raise CheckpointError(f"{record.peft_type} adapters do not support hotswapping.")
    weights = load_adapter_weights(model_name_or_path, subfolder=hub.get("subfolder"), device=torch_device or "cpu",
                                   **{k: v for k, v in hub.items() if k != "subfolder"})
    weights = _from_disk(config, weights)
    targets = adapter_tensors(model, adapter_name)
    unexpected = sorted(set(weights) - set(targets))
    missing = sorted(set(targets) - set(weights))
    if unexpected or missing:
        raise CheckpointError(
            f"hotswap needs the same target modules: keys only in the new adapter {unexpected[:5]}, "
            f"only in the loaded one {missing[:5]}."
        )
    padded_rank = model.__dict__.get(PADDED_RANK_ATTR)
    padded = padded_rank is not None  # prepare_model_for_compiled_hotswap: lower ranks fit, zero-padded
    bad = [f"{k}: {tuple(weights[k].shape)} vs {tuple(t.shape)}" for k, t in targets.items()
           if weights[k].shape != t.shape and not (padded and _fits(weights[k], t))]
    if bad:
        hint = (f" (at most the prepared rank {padded_rank})" if padded
                else "; prepare_model_for_compiled_hotswap(model, target_rank=...) lets lower ranks in")
        raise CheckpointError(f"hotswap needs equal shapes (same rank){hint}; differing: {bad[:5]}")
    with torch.no_grad():
        for key, tensor in targets.items():
            new = weights[key].to(device=tensor.device, dtype=tensor.dtype)
            if new.shape != tensor.shape:  # a lower rank into a padded adapter: the rest stays zero (exact)
                tensor.zero_()
                tensor = tensor[tuple(slice(0, n) for n in new.shape)]
            tensor.copy_(new)
    tie_shared_tensors(model, adapter_name)
    for name, layer in adapter_layers(model):
        if layer.has_adapter(adapter_name):
            layer.hotswap_update(adapter_name, config, name)
    config.inference_mode = old.inference_mode
    model.peft_config[adapter_name] = config
