"""``convert_to_lora`` / ``save_as_lora``: any additive adapter as a plain LoRA (HF PEFT 0.21's API).

An additive adapter changes a linear layer's weight by ``delta_weight(adapter)`` (the
``AdapterLayer`` protocol). Its truncated SVD ``U·S·Vᵀ`` gives LoRA factors ``B = U_k·S_k`` and
``A = V_kᵀ`` with ``lora_alpha = r`` (scaling 1), the best rank-``k`` approximation in Frobenius
norm. ``rank`` is either that ``k`` or, as a float in (0, 1], the share of the squared singular
values to keep (the smallest ``k`` reaching it, per layer, written to ``rank_pattern``).

Nothing here names a method: a layer is convertible when it says so itself
(``supports_lora_conversion(adapter_name)``), or else when its method declares the ``additive``
capability, implements ``delta_weight`` and its base layer is linear (``nn.Linear`` or
transformers' ``Conv1D``) — HF PEFT converts linear layers only. Multiplicative or orthogonal
methods (IA3, OFT, BOFT, HRA, RoAd) do not declare it and are refused with a ``TypeError`` naming
their layer types, as HF does, and saying why.

Differences from HF PEFT, on purpose:

- ``convert_to_lora_with_errors`` also returns each layer's relative approximation error
  ``‖ΔW - BA‖_F / ‖ΔW‖_F`` (from the discarded singular values, so it costs nothing).
- A DoRA adapter is converted from its true weight change (magnitude included); HF converts only
  its ``s·BA`` part.
- A LoRA trained with ``lora_bias=True`` keeps its bias (scaled) in the converted LoRA; HF drops it
  and the converted adapter's outputs differ.
- Layers that do not hold ``adapter_name`` are skipped (HF fails on them), and a ``modules_to_save``
  head is written from ``adapter_name``'s own copy under its full parameter path (HF keeps the last
  adapter's copy and only the last path component, which differs for nested heads).
"""

from __future__ import annotations

import copy
import os
import pathlib
import warnings
from typing import Any

import torch
from torch import nn

from peft_kernel import ModulesToSaveWrapper
from peft_kernel.plugin_api import (
    CONFIGS_ATTR,
    WEIGHTS_NAME,
    AdapterLayer,
    atomic_save_tensors,
    is_additive,
    walk_modules,
)
from peft_kernel_lora.config import LoraConfig

PEFT_PREFIX = "base_model.model."


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional here
        return None
    return Conv1D


def _base(layer: AdapterLayer) -> nn.Module:
    base = layer.base_layer
    while isinstance(base, AdapterLayer):  # stacked layers (mixed models): the innermost module
        base = base.base_layer
    return base


def supports_lora_conversion(layer: AdapterLayer, adapter_name: str = "default") -> bool:
    """Whether ``layer``'s adapter ``adapter_name`` can become a LoRA: the layer's own answer if it
    gives one, else an ``additive`` method's ``delta_weight`` on a linear base layer."""
    own = getattr(type(layer), "supports_lora_conversion", None)
    if own is not None:
        return bool(layer.supports_lora_conversion(adapter_name))
    if not is_additive(layer):
        return False
    base = _base(layer)
    conv1d = _conv1d_class()
    return isinstance(base, nn.Linear) or (conv1d is not None and isinstance(base, conv1d))


def _adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """Adapter layers with the path their tensors are saved under: a layer stacked under another
    (mixed models, ``<module>.base_layer``) goes by the outer layer's path."""
    paths: dict[str, str] = {}
    out = []
    for path, module in walk_modules(model):
        if isinstance(module, AdapterLayer):
            parent, _, last = path.rpartition(".")
            paths[path] = paths[parent] if last == "base_layer" and parent in paths else path
            out.append((paths[path], module))
    return out


def _cutoff(S: torch.Tensor, threshold: float) -> int:
    """The smallest ``k`` whose top-``k`` squared singular values reach ``threshold`` of the total."""
    energy = torch.cumsum(S.double() ** 2, dim=0)
    k = int(torch.searchsorted(energy, threshold * energy[-1]).item()) + 1
    return min(k, S.numel())


@torch.no_grad()
def _factorize(delta: torch.Tensor, rank: int | float, transposed: bool) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """``(lora_A, lora_B, k, relative error)`` for one delta weight in the base layer's layout
    (``transposed``: transformers' ``Conv1D``, stored [in, out])."""
    dtype = delta.dtype
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # no SVD for half precision
    k = rank if isinstance(rank, int) else _cutoff(S, rank)
    if k > U.shape[1]:
        raise ValueError(
            f"The chosen rank {k} is larger than the weight shape ({U.shape[1]}), please choose a lower rank."
        )
    total = float(S.double().pow(2).sum())
    dropped = float(S[k:].double().pow(2).sum())
    error = (dropped / total) ** 0.5 if total > 0 else 0.0
    lora_B = (U[:, :k] * S[:k]).to(dtype)
    lora_A = Vh[:k].to(dtype)
    if transposed:  # delta = U S Vh is [in, out]; the LoRA of the [out, in] map is Vhᵀ (U S)ᵀ
        return lora_B.T.contiguous(), lora_A.T.contiguous(), k, error
    return lora_A.contiguous(), lora_B.contiguous(), k, error


def _convert_layer(layer: AdapterLayer, rank: int | float, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    conv1d = _conv1d_class()
    transposed = conv1d is not None and isinstance(_base(layer), conv1d)
    return _factorize(layer.delta_weight(adapter_name).detach(), rank, transposed)


def _check_rank(rank: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"rank must be an int (a rank) or a float in (0, 1] (a threshold), got {rank!r}")
    if isinstance(rank, float) and not (0 < rank <= 1):
        raise ValueError(
            f"If rank is a float, it is interpreted as a threshold. It must be between 0 and 1 but got {rank}."
        )
    if isinstance(rank, int) and rank <= 0:
        raise ValueError("Passing a rank of 0 doesn't make sense, please pass a valid value.")


def convert_to_lora_with_errors(
    model: nn.Module,
    rank: float,
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, torch.Tensor], dict[str, float]]:
    """:func:`convert_to_lora`, plus ``{module: relative error}`` with each converted layer's
    ``‖ΔW - BA‖_F / ‖ΔW‖_F`` (0 where the rank reaches the delta's true rank)."""
    _check_rank(rank)
    layers = [(name, m) for name, m in _adapter_layers(model) if m.has_adapter(adapter_name)]
    if any(adapter_name in getattr(m, "lora_diag", {}) for _, m in layers):
        raise TypeError("Some module types on this model do not support LoRA conversion: KaSA adapters (kasa_config) "
                        "truncated the base weights, so no LoRA of the original base reproduces them (HF refuses them too).")
    unsupported = sorted({repr(type(m)) for _, m in layers if not supports_lora_conversion(m, adapter_name)})
    if unsupported:
        methods = sorted({str(getattr(m.peft_type, "value", m.peft_type)) for _, m in layers
                          if not supports_lora_conversion(m, adapter_name)})
        raise TypeError(
            f"Some module types on this model do not support LoRA conversion: {', '.join(unsupported)}. "
            f"Only additive adapters (W' = W + delta W, the 'additive' capability) on linear layers convert; "
            f"{', '.join(methods)} on these layers does not: a multiplicative or orthogonal update depends on the "
            "base weight. Merge it into the base instead (merge_and_unload)."
        )
    if not layers:
        raise TypeError("Could not detect any layer that supports LoRA conversion.")

    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):  # a model from inject_adapter_in_model
        configs = model.__dict__.get(CONFIGS_ATTR)
    peft_config = configs.get(adapter_name) if isinstance(configs, dict) else None
    if peft_config is not None and isinstance(peft_config, LoraConfig):
        warnings.warn("Converting a PEFT adapter to LoRA that is already a LoRA adapter. There is typically no need for that.", stacklevel=2)
    config_bias = getattr(peft_config, "bias", "none")
    if config_bias != "none":
        raise ValueError(f"The adapter's config sets bias={config_bias}, this is not supported right now.")
    lora_bias = bool(getattr(peft_config, "lora_bias", False))  # HF PEFT drops it silently

    kwargs: dict[str, Any] = {"rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": set()}
    fixed = isinstance(rank, int)
    if peft_config is not None:
        targets = copy.copy(peft_config.target_modules)
        kwargs["target_modules"] = set(targets) if isinstance(targets, (list, tuple)) else (targets if targets is not None else set())
        kwargs["base_model_name_or_path"] = peft_config.base_model_name_or_path
        if hasattr(peft_config, "layers_pattern"):
            kwargs["layers_pattern"] = peft_config.layers_pattern
            kwargs["layers_to_transform"] = peft_config.layers_to_transform
        lora_config = LoraConfig(r=rank if fixed else 1, lora_alpha=rank if fixed else 1, **kwargs)
    else:
        lora_config = LoraConfig(r=rank if fixed else 1, target_modules=set(), **kwargs)
    if lora_config.target_modules is None or isinstance(lora_config.target_modules, list):
        lora_config.target_modules = set(lora_config.target_modules or ())
    lora_config.lora_bias = lora_bias
    # aLoRA stays aLoRA (HF PEFT drops the invocation: its LoRA then adapts every token)
    lora_config.alora_invocation_tokens = getattr(peft_config, "alora_invocation_tokens", None)

    convert = torch.compile(_convert_layer, **compile_kwargs) if compile_kwargs is not None else _convert_layer
    from tqdm.auto import tqdm

    state_dict: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for name, layer in tqdm(layers, disable=not progressbar, desc="Converting to LoRA"):
        lora_A, lora_B, k, error = convert(layer, rank, adapter_name)
        short = name.removeprefix(PEFT_PREFIX)
        if k == 0:
            lora_config.exclude_modules.add(short)
            continue
        if k != rank or isinstance(lora_config.target_modules, str):
            lora_config.rank_pattern[short] = k
            lora_config.alpha_pattern[short] = k
        else:
            lora_config.target_modules.add(short)
        state_dict[f"{name}.lora_A.weight"] = lora_A
        state_dict[f"{name}.lora_B.weight"] = lora_B
        if lora_bias:  # lora_B's bias, scaled as the adapter scales it (the LoRA's scaling is 1)
            state_dict[f"{name}.lora_B.bias"] = (layer.lora_B[adapter_name].bias * layer.scaling[adapter_name]).detach()
        errors[short] = error

    if peft_config is not None and getattr(peft_config, "modules_to_save", None):
        lora_config.modules_to_save = copy.copy(peft_config.modules_to_save)
        for name, module in walk_modules(model, stop=(ModulesToSaveWrapper,)):
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                for param_name, param in module.modules_to_save[adapter_name].named_parameters():
                    state_dict[f"{name}.{param_name}"] = param.data
    return lora_config, state_dict, errors


def convert_to_lora(
    model: torch.nn.Module,
    rank: float,
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs=None,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """HF PEFT's ``convert_to_lora``: ``(LoraConfig, state_dict)`` of a LoRA approximating the
    additive adapter ``adapter_name`` of ``model`` (a ``PeftModel`` or a model with injected
    adapters). ``rank``: an int, or a float in (0, 1] (the share of squared singular values kept,
    per layer). The state dict uses HF's on-disk keys (``base_model.model.<module>.lora_A.weight``)
    and ``lora_alpha == r`` (the scaling is baked in). Raises ``TypeError`` when a layer holding the
    adapter is not additive or not linear, ``ValueError`` for a bad rank.
    :func:`convert_to_lora_with_errors` also returns the approximation error per layer."""
    config, state_dict, _ = convert_to_lora_with_errors(model, rank, adapter_name, progressbar, compile_kwargs)
    return config, state_dict


def save_as_lora(
    path: str | os.PathLike,
    model: torch.nn.Module,
    rank: float,
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs=None,
) -> None:
    """HF PEFT's ``save_as_lora``: :func:`convert_to_lora`, then ``adapter_model.safetensors`` and
    ``adapter_config.json`` written (atomically) into ``path``, loadable by ``PeftModel.from_pretrained``
    here and in HF PEFT."""
    config, state_dict = convert_to_lora(model, rank, adapter_name, progressbar, compile_kwargs)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(path / WEIGHTS_NAME, state_dict)
    config.save_pretrained(path)
