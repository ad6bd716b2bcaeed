"""Small user-facing helpers with HF PEFT's names: ``check_if_peft_model``, ``rescale_adapter_scale``."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from torch import nn

from peft_kernel.errors import PeftKernelError
from peft_kernel.layer import adapter_layers


def check_if_peft_model(model_name_or_path: str | os.PathLike) -> bool:
    """True when ``model_name_or_path`` (folder or Hub id) holds a readable adapter config."""
    from peft_kernel.config import PeftConfig

    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:
        return False
    return True


@contextlib.contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: float) -> Iterator[None]:
    """Multiply every adapter's ``scaling`` by ``multiplier`` inside the block (restored after)."""
    if not isinstance(multiplier, (int, float)) or isinstance(multiplier, bool):
        raise TypeError(f"multiplier must be a number, got {type(multiplier).__name__}")
    layers = [layer for _, layer in adapter_layers(model) if isinstance(getattr(layer, "scaling", None), dict)]
    if not layers:
        raise PeftKernelError("rescale_adapter_scale needs adapter layers with a `scaling` (LoRA-like methods); none found.")
    saved = [dict(layer.scaling) for layer in layers]
    try:
        for layer in layers:
            for name in layer.scaling:
                layer.scaling[name] *= multiplier
        yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.clear()
            layer.scaling.update(scaling)
