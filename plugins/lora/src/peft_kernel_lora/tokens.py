"""LoRA's ``trainable_token_indices``: next to the LoRA layers, selected embedding rows train (new
special tokens), through the shared token-rows layer (the ``peft-kernel-tokens`` library, as the Trainable Tokens
method uses).

``trainable_token_indices`` is a list of token ids for the input embedding, or ``{module name:
token ids}``. A module tied to the input embedding (a tied ``lm_head``, T5's encoder / decoder
embeddings) gets the same rows: one parameter, trained once. On disk the rows are HF PEFT's
``<module>.token_adapter.trainable_tokens_delta``, saved once per tied group (under its first
module, the input embedding), as HF PEFT does.
"""

from __future__ import annotations

from typing import Any

from peft_kernel.plugin_api import ConfigError, base_of, standard_match

OUR_SUFFIX = ".trainable_tokens_delta"
HF_SUFFIX = ".token_adapter.trainable_tokens_delta"


def _input_embedding(model: Any) -> Any:
    get = getattr(model, "get_input_embeddings", None)
    return base_of(get()) if callable(get) and get() is not None else None


def explicit_indices(config: Any, module_name: str) -> list[int] | None:
    """The token ids the config names for ``module_name`` itself (``None``: it names none)."""
    spec = config.trainable_token_indices
    if isinstance(spec, dict):
        return next((list(ids) for key, ids in spec.items() if module_name == key or module_name.endswith("." + key)), None)
    return None


def is_token_target(config: Any, module_name: str, module: Any, model: Any) -> bool:
    """Whether ``module`` gets token rows: named by the config, or (the list form) the input
    embedding, or tied to an input embedding that gets them."""
    spec = config.trainable_token_indices
    if not spec:
        return False
    if explicit_indices(config, module_name) is not None:
        return True
    embedding, base = _input_embedding(model), base_of(module)
    if embedding is None:
        return False
    tied = base is embedding or getattr(base, "weight", None) is getattr(embedding, "weight", 0)
    if not tied:
        return False
    if isinstance(spec, (list, tuple)):
        return True
    path = next((name for name, m in model.named_modules() if m is embedding), None)
    return path is not None and explicit_indices(config, path) is not None


def match(config: Any, module_name: str, module: Any, model: Any) -> bool | None:
    """``peft_kernel_match_target`` for LoRA configs with token rows (``None``: the standard rule)."""
    if not is_token_target(config, module_name, module, model):
        return None
    if standard_match(config, module_name):
        raise ConfigError(f"LoraConfig: {module_name!r} is both a LoRA target (target_modules) and a "
                          "trainable_token_indices module; a module can be one or the other.")
    return True


def shared_rows(config: Any, targets: list[tuple[str, Any]]) -> dict[str, Any] | None:
    """One row parameter per embedding weight among the token modules (tied modules share it),
    handed to the layers as ``token_rows:<module>`` / ``token_indices:<module>``."""
    if not config.trainable_token_indices:
        return None
    import torch
    from torch import nn

    check_indices, indices_key, rows_key = _trainable_tokens("check_indices", "indices_key", "rows_key")

    tokens = [(path, base_of(module)) for path, module in targets if not standard_match(config, path)]
    groups: dict[int, list[tuple[str, Any]]] = {}
    for path, base in tokens:
        groups.setdefault(id(base.weight), []).append((path, base))
    shared: dict[str, Any] = {}
    spec = config.trainable_token_indices
    for members in groups.values():
        named = [explicit_indices(config, path) for path, _ in members]
        indices = next((ids for ids in named if ids is not None), list(spec) if isinstance(spec, (list, tuple)) else None)
        if indices is None:
            raise ConfigError(f"LoraConfig.trainable_token_indices names none of {[p for p, _ in members]}")
        path, base = members[0]
        check_indices(indices, base.weight, path)
        rows = nn.Parameter(base.weight.detach()[indices].clone())
        for path, _ in members:
            shared[rows_key(path)] = rows
            shared[indices_key(path)] = torch.tensor(indices)
    return shared or None


def _trainable_tokens(*names: str) -> tuple[Any, ...]:
    """Names from the token-rows library (an optional dependency: the ``tokens`` extra)."""
    try:
        from peft_kernel_tokens import layers
    except ImportError:
        raise ConfigError("LoraConfig.trainable_token_indices needs the token-rows library: "
                          "pip install peft-kernel-tokens (or peft-kernel-lora[tokens])") from None
    return tuple(getattr(layers, name) for name in names)


def make_token_layer(adapter_name: str, base_layer: Any, module_name: str, shared: dict[str, Any]) -> Any:
    TrainableTokensLayer, indices_key, rows_key = _trainable_tokens("TrainableTokensLayer", "indices_key", "rows_key")
    layer = TrainableTokensLayer(base_layer)
    layer.add_rows(adapter_name, shared[rows_key(module_name)], shared[indices_key(module_name)].tolist())
    return layer


def has_rows_for(module_name: str, shared: dict[str, Any] | None) -> bool:
    return bool(shared) and _trainable_tokens("rows_key")[0](module_name) in shared


def map_state_dict(state_dict: dict[str, Any], direction: str) -> dict[str, Any] | None:
    """Our ``<module>.trainable_tokens_delta`` <-> HF's ``<module>.token_adapter.trainable_tokens_delta``;
    on save a tied group's rows are written once (HF PEFT's LoRA format)."""
    if direction == "load":
        if not any(k.endswith(HF_SUFFIX) for k in state_dict):
            return None
        return {(k[: -len(HF_SUFFIX)] + OUR_SUFFIX if k.endswith(HF_SUFFIX) else k): v for k, v in state_dict.items()}
    if not any(k.endswith(OUR_SUFFIX) for k in state_dict):
        return None
    out, seen = {}, set()
    for key, value in state_dict.items():
        if key.endswith(OUR_SUFFIX):
            storage = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            if storage in seen:
                continue
            seen.add(storage)
            key = key[: -len(OUR_SUFFIX)] + HF_SUFFIX
        out[key] = value
    return out
