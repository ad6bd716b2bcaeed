"""HF PEFT's ``peft.utils.hotswap``: swap an adapter's weights in place, also under ``torch.compile``.

:func:`prepare_model_for_compiled_hotswap` zero-pads every adapter to ``target_rank`` (exact:
padding adds zeros) so that a later :func:`hotswap_adapter` of an adapter of lower rank or another
alpha changes only tensor values. Unlike HF PEFT, the scalings stay Python floats for the eager
paths: the compiled path (:mod:`peft_kernel.compiled`) reads them from tensors refreshed in place,
so a hotswap does not recompile either way.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Mapping

from torch import nn

from peft_kernel.adapter_io import PADDED_RANK_ATTR, hotswap_adapter
from peft_kernel.layer import adapter_layers

__all__ = ["hotswap_adapter", "prepare_model_for_compiled_hotswap"]

def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: Any | Mapping[str, Any] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Prepare ``model`` (after loading its first adapter, before ``torch.compile``) for hotswapping
    adapters of other ranks (up to ``target_rank``) and alphas without recompiling. Pads every
    adapter's low-rank factors to ``target_rank`` with zeros, in place; ``config`` (a config or
    ``{adapter name: config}``) gets ``r = target_rank``. ``check_compiled``: what to do if the
    model is already compiled (``"error"``, ``"warn"``, ``"ignore"``)."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead.")
    if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
        message = "Call prepare_model_for_compiled_hotswap *before* compiling the model"
        if check_compiled == "error":
            raise ValueError(message)
        if check_compiled == "warn":
            warnings.warn(message, UserWarning, stacklevel=2)
    layers = [(name, layer) for name, layer in adapter_layers(model) if layer.adapter_names()]
    if not layers:
        raise ValueError(
            "No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` after loading "
            "the first adapter and before loading the second adapter."
        )
    if target_rank is None:
        return
    if not isinstance(target_rank, int) or isinstance(target_rank, bool) or target_rank <= 0:
        raise ValueError(f"target_rank must be a positive integer, got {target_rank!r}")
    for name, layer in layers:
        for adapter in layer.adapter_names():
            if not layer.pad_rank(adapter, target_rank):
                raise ValueError(f"{type(layer).__name__} at {name!r} (adapter {adapter!r}) cannot be padded to a target rank.")
    configs = config.values() if isinstance(config, Mapping) else [] if config is None else [config]
    for cfg in configs:
        cfg.r = target_rank
    target = getattr(model, "_orig_mod", model)
    target.__dict__[PADDED_RANK_ATTR] = target_rank
