"""Entry module of peft-kernel-hra: registers HRA and declares its layers. Cheap to import."""

from __future__ import annotations

from typing import Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_hra.config import HRAConfig


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="HRA",
            config_class=HRAConfig,
            prefix="hra_",
            capabilities={"mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="HRAModel",
            layer_factory="peft_kernel_hra.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={"HRALayer": "peft_kernel_hra.layers:HRALayer"},
        )
    )
