"""LoRA's ``layer_replication``: before the adapter is added, the model's stack of decoder (or encoder)
layers is rebuilt from ranges of the original one, ``[[0, 4], [2, 5]]`` giving layers 0-3, 2-4, as HF
PEFT does. A repeated layer is a new module whose parameters and buffers *are* the original's (no
memory for the base weights), with its own ``layer_idx`` (the key/value cache slot) and, once LoRA is
added, its own adapters. ``config.num_hidden_layers`` (and a per-layer ``layer_types`` list) follow.

Beyond HF: the layer stack is found by its length for any architecture (GPT-2 included; HF knows
Llama-, BERT- and Falcon-like paths); ranges are checked before anything changes; a second adapter
must ask for the same replication (HF replicates again, and the first adapter's layers are lost);
and merging is refused where a base weight is shared by several layers (folding one layer's update
into it would change the others: HF's guard never fires and the merged model is silently wrong).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from torch import nn

from peft_kernel.plugin_api import ConfigError

APPLIED = "_peft_kernel_layer_replication"
"""Model attribute holding the replication already applied."""
SHARED = "_peft_kernel_shared_by_replication"
"""Attribute set on base parameters that several replicated layers share."""


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config


def _layer_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The ``nn.ModuleList`` of the model's ``num_hidden_layers`` transformer layers."""
    count = getattr(_text_config(model), "num_hidden_layers", None)
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and path:
            parent_path, _, name = path.rpartition(".")
            return model.get_submodule(parent_path), name, module
    raise ConfigError(f"LoraConfig.layer_replication: found no list of {count} layers (config.num_hidden_layers) "
                      f"in {type(model).__name__}")


def _order(ranges: Any, count: int) -> list[int]:
    if not isinstance(ranges, (list, tuple)) or not ranges:
        raise ConfigError(f"LoraConfig.layer_replication must be a non-empty list of [start, end] ranges, got {ranges!r}")
    order: list[int] = []
    for item in ranges:
        ok = isinstance(item, (list, tuple)) and len(item) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in item)
        if not ok or not 0 <= item[0] < item[1] <= count:
            raise ConfigError(f"LoraConfig.layer_replication: {item!r} is not a range [start, end) with "
                              f"0 <= start < end <= {count} (the model's layers)")
        order.extend(range(item[0], item[1]))
    return order


def _sharing_copy(layer: nn.Module) -> nn.Module:
    """New modules, the same parameter and buffer objects."""
    memo = {id(t): t for t in itertools.chain(layer.parameters(), layer.buffers())}
    return copy.deepcopy(layer, memo)


def replicate(model: nn.Module, ranges: Any) -> None:
    """Apply ``ranges`` to ``model``'s layer stack (once; a later adapter must repeat the same ranges)."""
    applied = getattr(model, APPLIED, None)
    wanted = [list(r) for r in ranges] if isinstance(ranges, (list, tuple)) else ranges
    if applied is not None:
        if applied != wanted:
            raise ConfigError(f"LoraConfig.layer_replication={ranges!r}, but this model's layers were already "
                              f"replicated as {applied!r}; every adapter must use the same layer_replication")
        return
    parent, name, stack = _layer_stack(model)
    order = _order(ranges, len(stack))
    seen: set[int] = set()
    layers = []
    for index, source in enumerate(order):
        layer = stack[source] if source not in seen else _sharing_copy(stack[source])
        seen.add(source)
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
        layers.append(layer)
    repeated = {s for s in order if order.count(s) > 1}
    for source in repeated:
        for tensor in stack[source].parameters():
            setattr(tensor, SHARED, True)
    setattr(parent, name, nn.ModuleList(layers))
    config = _text_config(model)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == len(stack):
        config.layer_types = [types[s] for s in order]
    config.num_hidden_layers = len(order)
    setattr(model, APPLIED, wanted)


def check_merge(layer: Any, adapter_name: str) -> None:
    """Refuse to fold an update into a base weight that replicated layers share."""
    if getattr(getattr(layer.base_layer, "weight", None), SHARED, False):
        from peft_kernel.plugin_api import UnsupportedFeatureError

        raise UnsupportedFeatureError(
            f"cannot merge LoRA adapter {adapter_name!r}: with layer_replication its base weight is shared by several "
            "layers, so merging one layer's update would change the others (HF PEFT merges anyway and the merged "
            "model is wrong). Use the adapters unmerged, or save them and load them into a model without replication."
        )
