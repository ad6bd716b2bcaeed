"""HF PEFT's training helpers: ``prepare_model_for_kbit_training``, ``cast_mixed_precision_params``,
``shift_tokens_right``. Generic: no adapter method is involved."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

_QUANT_METHODS_KEEP_DTYPES = ("gptq", "aqlm", "eetq", "torchao", "hqq")
"""Quantization methods whose parameters ``prepare_model_for_kbit_training`` leaves in their dtype."""


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Get a (quantized) transformers model ready for adapter training, as HF PEFT does: freeze every
    parameter; upcast float16/bfloat16 parameters to float32 (not for GPTQ/AQLM/EETQ/torchao/HQQ
    models, nor bitsandbytes 4-bit storage); and for quantized models with gradient checkpointing,
    make the input embeddings' output require grad and enable checkpointing."""
    method = getattr(model, "quantization_method", None)
    keep_dtypes = method in _QUANT_METHODS_KEEP_DTYPES or bool(getattr(model, "hqq_quantized", False))
    quantized = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False) or keep_dtypes
    gradient_checkpointing_kwargs = gradient_checkpointing_kwargs or {}
    for param in model.parameters():
        param.requires_grad = False
    if not keep_dtypes:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if quantized and use_gradient_checkpointing:
        if gradient_checkpointing_kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(_output_requires_grad)
        enable = model.gradient_checkpointing_enable
        if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
            enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            if gradient_checkpointing_kwargs:
                warnings.warn("gradient_checkpointing_kwargs is not supported by this transformers version and is "
                              "ignored.", FutureWarning, stacklevel=2)
            enable()
    return model


def _output_requires_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters to ``dtype`` (float16 / bfloat16), trainable ones to float32: half the
    memory for the base, full precision for what trains under mixed-precision training."""
    for param in model.parameters():
        param.data = param.to(dtype if not param.requires_grad else torch.float32)


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs from labels: shift one position right, start with ``decoder_start_token_id``,
    and replace ``-100`` (ignored label positions) by ``pad_token_id``."""
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    if pad_token_id is None:
        raise ValueError("self.model.config.pad_token_id has to be defined.")
    shifted.masked_fill_(shifted == -100, pad_token_id)
    return shifted
