"""Entry module of peft-kernel-delora: the method is a declaration. Keep it cheap (no torch)."""

from __future__ import annotations

from typing import Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_delora.config import DeloraConfig


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="DELORA",
            config_class=DeloraConfig,
            prefix="delora_",
            capabilities={"additive", "mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="DeloraModel",
            layer_factory="peft_kernel_delora.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={"DeloraLinear": "peft_kernel_delora.layers:DeloraLinear"},
        )
    )
