"""Entry module of peft-kernel-fourierft: the method is a declaration. Keep it cheap (no torch)."""

from __future__ import annotations

from typing import Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_fourierft.config import FourierFTConfig

FOURIERFT_TARGET_MODULES = {**DEFAULT_TARGET_MODULES, "gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}
"""HF PEFT's defaults for FourierFT: the low-rank table, except GPT-2 style models' MLP output."""


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="FOURIERFT",
            config_class=FourierFTConfig,
            prefix="fourierft_",
            capabilities={"additive", "mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="FourierFTModel",
            layer_factory="peft_kernel_fourierft.layers:make_layer",
            default_target_modules=FOURIERFT_TARGET_MODULES,
            exports={"FourierFTLayer": "peft_kernel_fourierft.layers:FourierFTLayer"},
        )
    )
