"""peft-kernel-qaic: the Qualcomm Cloud AI 100 backend of peft-kernel.

Public classes load lazily (``import peft_kernel_qaic`` imports neither torch nor onnx):

- :class:`QEffAutoLoraModelForCausalLM` -- one base model, many LoRA adapters stacked in one static
  ONNX graph; each batch row picks its adapter by id (``0`` = ``"base"``).
- :class:`QEffAutoPeftModelForCausalLM` -- one LoRA adapter whose weights are graph inputs, so
  adapters of the same shape swap without re-export or recompile.
- :func:`apply_peft` -- QEfficient's fine-tuning helper.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "QEffAutoLoraModelForCausalLM": "peft_kernel_qaic.lora_model",
    "QEffAutoPeftModelForCausalLM": "peft_kernel_qaic.peft_model",
    "GenerationResult": "peft_kernel_qaic.runtime",
    "apply_peft": "peft_kernel_qaic.finetune",
    "build_compile_command": "peft_kernel_qaic.compiler",
    "QaicError": "peft_kernel_qaic.errors",
    "AdapterLoadError": "peft_kernel_qaic.errors",
    "AdapterMappingError": "peft_kernel_qaic.errors",
    "AdapterSlotError": "peft_kernel_qaic.errors",
    "PromptTooLongError": "peft_kernel_qaic.errors",
    "SDKNotFoundError": "peft_kernel_qaic.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'peft_kernel_qaic' has no attribute {name!r}")
