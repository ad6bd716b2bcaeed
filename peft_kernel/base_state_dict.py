"""``get_base_model_state_dict`` / ``set_base_model_state_dict``: the base model's own tensors
under their original keys, read from or written into a model with adapters (HF PEFT's functions).

Keys drop the wrapper segments adapters add — ``base_layer`` inside an adapter layer and
``original_module`` inside a ``modules_to_save`` wrapper — and every adapter tensor is left out.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import torch
from torch import nn

from peft_kernel.layer import AdapterLayer
from peft_kernel.modules_to_save import ModulesToSaveWrapper

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

_INFIX = {AdapterLayer: "base_layer", ModulesToSaveWrapper: "original_module"}


def _plain_model(model: nn.Module) -> tuple[nn.Module, bool]:
    """The model holding the (possibly wrapped) base modules; True when its host wraps no layer
    (``base_model`` is no tuner: prompt learning), so the keys are the model's own."""
    from peft_kernel.model import PeftModel
    from peft_kernel.tuner import AdapterModel

    if isinstance(model, PeftModel):
        return model.get_base_model(), not isinstance(model.base_model, AdapterModel)
    return model, False


def _original_keys(root: nn.Module) -> dict[str, str]:
    """``{live key: original key}`` for every base tensor of ``root`` (adapter tensors left out)."""
    out: dict[str, str] = {}

    def visit(module: nn.Module, live: str, original: str) -> None:
        infix = next((name for cls, name in _INFIX.items() if isinstance(module, cls)), None)
        if infix is not None:  # only the wrapped original belongs to the base model
            visit(getattr(module, infix), f"{live}{infix}.", original)
            return
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and name not in module._non_persistent_buffers_set:
                out[f"{live}{name}"] = f"{original}{name}"
        for name, child in module._modules.items():
            if child is not None:
                visit(child, f"{live}{name}.", f"{original}{name}.")

    visit(root, "", "")
    return out


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with the keys it had before adapters were added."""
    root, prompt = _plain_model(model)
    live = root.state_dict()
    if prompt:
        return dict(live)
    return {original: live[key] for key, original in _original_keys(root).items() if key in live}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> Any:
    """Load a state dict with original (pre-adapter) keys into the base tensors; returns
    ``(missing_keys, unexpected_keys)``, and with ``strict`` raises ``RuntimeError`` if either is non-empty."""
    root, prompt = _plain_model(model)
    if prompt:
        return root.load_state_dict(state_dict, strict=strict)
    to_live = {original: key for key, original in _original_keys(root).items()}
    unexpected = [k for k in state_dict if k not in to_live]
    missing = [k for k in to_live if k not in state_dict]
    if strict and (missing or unexpected):
        problems = []
        if missing:
            problems.append(f"Missing key(s) in state_dict: {missing}")
        if unexpected:
            problems.append(f"Unexpected key(s) in state_dict: {unexpected}")
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(problems))
    root.load_state_dict({to_live[k]: v for k, v in state_dict.items() if k in to_live}, strict=False)
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)
