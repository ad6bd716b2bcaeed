"""Entry module of peft-kernel-poly: the method is a declaration. Keep it cheap (no torch)."""

from __future__ import annotations

from typing import Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_poly.config import PolyConfig


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="POLY",
            config_class=PolyConfig,
            prefix="poly_",
            capabilities={"task_ids", "mixed_batch", "multi_adapter"},
            tuner_name="PolyModel",
            layer_factory="peft_kernel_poly.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={"PolyLinear": "peft_kernel_poly.layers:PolyLinear"},
        )
    )
