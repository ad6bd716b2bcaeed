"""Entry module of peft-kernel-waveft: the method is a declaration, plus the hook that hands each
layer its share of ``proportional_parameters``. Keep it cheap (no torch at import)."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_waveft.config import WaveFTConfig

WAVEFT_TARGET_MODULES = {
    **{model: modules for model, modules in DEFAULT_TARGET_MODULES.items() if model not in ("btlm", "rwkv", "rwkv7")},
    "gpt2": ["mlp.c_proj"],
    "gpt_bigcode": ["mlp.c_proj"],
}
"""HF PEFT's defaults for WaveFT: the low-rank table less BTLM and RWKV, GPT-2 style models' MLP output."""


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="WAVEFT",
            config_class=WaveFTConfig,
            prefix="waveft_",
            capabilities={"additive", "mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="WaveFTModel",
            layer_factory="peft_kernel_waveft.layers:make_layer",
            default_target_modules=WAVEFT_TARGET_MODULES,
            exports={"WaveFTLayer": "peft_kernel_waveft.layers:WaveFTLayer"},
        )
    )


@hookimpl
def peft_kernel_create_shared_tensors(config: Any, adapter_name: str, targets: list[tuple[str, Any]]) -> Any:
    """With ``proportional_parameters``, the adapter's model-level sizes that each layer's share of
    coefficients is computed from (see :func:`peft_kernel_waveft.layers.proportional_count`). They
    go to the layers only, in no container, so they are never saved."""
    if not isinstance(config, WaveFTConfig) or not config.proportional_parameters:
        return None
    from peft_kernel_waveft.layers import target_sizes

    return target_sizes(targets)
