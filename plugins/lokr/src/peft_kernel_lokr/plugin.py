"""Entry module of peft-kernel-lokr: registers LoKr and declares its layers. Cheap to import."""

from __future__ import annotations

from typing import Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_lokr.config import LoKrConfig


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="LOKR",
            config_class=LoKrConfig,
            prefix="lokr_",
            capabilities={"additive", "mergeable", "mixed_batch", "hotswap", "multi_adapter"},
            tuner_name="LoKrModel",
            layer_factory="peft_kernel_lokr.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={
                "LoKrLayer": "peft_kernel_lokr.layers:LoKrLayer",
            },
        )
    )
