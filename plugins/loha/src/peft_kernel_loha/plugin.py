"""Entry module of peft-kernel-loha: registers LoHa and declares its layers. Cheap to import."""

from __future__ import annotations

from typing import Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_loha.config import LoHaConfig


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="LOHA",
            config_class=LoHaConfig,
            prefix="hada_",
            capabilities={"additive", "mergeable", "mixed_batch", "hotswap", "multi_adapter"},
            tuner_name="LoHaModel",
            layer_factory="peft_kernel_loha.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={
                "LoHaLayer": "peft_kernel_loha.layers:LoHaLayer",
            },
        )
    )
