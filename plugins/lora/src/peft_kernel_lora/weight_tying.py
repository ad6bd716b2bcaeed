"""``ensure_weight_tying``: adapters on tied layers (a transformers model's input embedding and the
output layer sharing its weight) stay tied, as in HF PEFT.

- ``modules_to_save``: naming any tied layer wraps all of them; their trainable copies share one
  weight (one parameter counted, saved under every layer's key).
- ``target_modules``: naming any tied layer gives all of them LoRA; an output layer's ``lora_A`` /
  ``lora_B`` are the transposed views of the embedding's ``lora_embedding_B`` / ``lora_embedding_A``
  (shared storage, separate parameters, saved under both keys: HF's layout). Merging folds the
  shared delta into the shared weight once, from the embedding (HF PEFT 0.21.2 folds it twice).

The config is completed before matching with the tied layers' full paths (HF writes the
embedding's path and drops the output layer's name; loading either form gives the same model).
HF's warnings are given where tying is asked for and impossible, or possible and not asked for.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from peft_kernel.plugin_api import ModulesToSaveWrapper, base_of, standard_match, walk_modules

UNTIED_WARNING = ("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but `ensure_weight_tying` "
                  "is not set to True. This can lead to complications, for example when merging the adapter or converting "
                  "your model to formats other than safetensors. Check the discussion here: "
                  "https://github.com/huggingface/peft/issues/2777")


def tied_group(model: nn.Module) -> list[str]:
    """Paths of the layers sharing the input embedding's weight, the embedding first; ``[]`` when
    the model has no output layer tied to it (or no ``get_input_embeddings``, as HF)."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return []
    embedding, output = get_in(), get_out()
    if embedding is None or output is None:
        return []
    weight = base_of(_unwrap(embedding)).weight
    if getattr(base_of(_unwrap(output)), "weight", None) is not weight:
        return []
    from peft_kernel_lora.layers import LoraLayer

    tied = [(path, module) for path, module in walk_modules(model, stop=(LoraLayer, ModulesToSaveWrapper))
            if path and getattr(base_of(_unwrap(module)), "weight", None) is weight]
    return [path for path, module in tied if module is embedding] + [path for path, module in tied if module is not embedding]


def _unwrap(module: nn.Module) -> nn.Module:
    return module.original_module if isinstance(module, ModulesToSaveWrapper) else module


def _names_hit(names: Any, path: str) -> bool:
    return any(path == n or path.endswith("." + n) for n in names or ())


def prepare(config: Any, model: nn.Module) -> None:
    """Complete ``modules_to_save`` / ``target_modules`` with every tied layer when one is named
    (``ensure_weight_tying``), or give HF's warnings."""
    group = tied_group(model)
    in_mts = any(_names_hit(config.modules_to_save, p) for p in group)
    in_targets = any(standard_match(config, p) for p in group)
    if not config.ensure_weight_tying:
        if in_mts or in_targets:
            warnings.warn(UNTIED_WARNING, UserWarning, stacklevel=4)
        return
    if not group:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model",
                      UserWarning, stacklevel=4)
        return
    if not (in_mts or in_targets):
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                      "`modules_to_save` or `target_modules`", UserWarning, stacklevel=4)
        return
    if config.use_dora and in_targets:
        raise ValueError("ensure_weight_tying=True cannot tie DoRA adapters on tied layers; use plain LoRA there.")
    if in_mts:
        config.modules_to_save = list(config.modules_to_save) + [p for p in group if p not in config.modules_to_save]
    if in_targets:
        targets = config.target_modules
        if isinstance(targets, str):
            config.target_modules = f"(?:{targets})|" + "|".join(re.escape(p) for p in group)
        else:
            config.target_modules = set(targets) | set(group)


def tie(model: nn.Module, adapter_name: str, config: Any) -> None:
    """After injection: share the tied layers' trainable copies / LoRA tensors (see the module docstring)."""
    group = tied_group(model)
    if not group:
        return
    modules = dict(walk_modules(model))
    first, *followers = (modules[p] for p in group)
    if isinstance(first, ModulesToSaveWrapper) and adapter_name in first.modules_to_save:
        weight = first.modules_to_save[adapter_name].weight
        for follower in followers:
            if isinstance(follower, ModulesToSaveWrapper) and adapter_name in follower.modules_to_save:
                follower.modules_to_save[adapter_name].weight = weight
    if getattr(first, "lora_embedding_A", {}).get(adapter_name) is not None:
        for follower in followers:
            if adapter_name in getattr(follower, "r", {}):
                _tie_lora(first, follower, adapter_name)


def _share(source: torch.Tensor, transpose: bool) -> nn.Parameter:
    view = source.detach().T if transpose else source.detach()
    return nn.Parameter(view, requires_grad=source.requires_grad)


def _tie_lora(embedding: Any, follower: Any, adapter_name: str) -> None:
    """``follower`` (an output ``Linear``, or another ``Embedding``) computes with ``embedding``'s
    LoRA tensors; its own merge and unmerge become no-ops."""
    emb_a, emb_b = embedding.lora_embedding_A[adapter_name], embedding.lora_embedding_B[adapter_name]
    if adapter_name in follower.lora_embedding_A:
        follower.lora_embedding_A[adapter_name] = _share(emb_a, transpose=False)
        follower.lora_embedding_B[adapter_name] = _share(emb_b, transpose=False)
    else:
        if follower.lora_B[adapter_name].bias is not None:
            raise ValueError("ensure_weight_tying=True cannot tie a LoRA bias (lora_bias=True): the embedding has none.")
        follower.lora_A[adapter_name].weight = _share(emb_b, transpose=True)  # [r, dim] = B_embᵀ
        follower.lora_B[adapter_name].weight = _share(emb_a, transpose=True)  # [vocab, r] = A_embᵀ
    follower.tied_adapters.add(adapter_name)
