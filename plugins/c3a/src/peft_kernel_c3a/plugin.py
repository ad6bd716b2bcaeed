"""Entry module of peft-kernel-c3a: registers C3A and declares its layer. Cheap to import."""

from __future__ import annotations

from typing import Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_c3a.config import C3AConfig


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="C3A",
            config_class=C3AConfig,
            prefix="c3a_",
            capabilities={"additive", "mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="C3AModel",
            layer_factory="peft_kernel_c3a.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={"C3ALinear": "peft_kernel_c3a.layers:C3ALinear"},
        )
    )
