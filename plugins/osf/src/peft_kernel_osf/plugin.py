"""Entry module of peft-kernel-osf: the method is a declaration. Keep it cheap (no torch)."""

from __future__ import annotations

from typing import Callable

from peft_kernel.plugin_api import ALL_LINEAR, ANY_MODEL_TYPE, MethodRecord, hookimpl
from peft_kernel_osf.config import OSFConfig


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="OSF",
            config_class=OSFConfig,
            prefix="osf_",
            capabilities={"additive", "mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="OSFModel",
            layer_factory="peft_kernel_osf.layers:make_layer",
            default_target_modules={ANY_MODEL_TYPE: ALL_LINEAR},  # HF PEFT: every linear layer of any model
            exports={"OSFLinear": "peft_kernel_osf.layers:OSFLinear"},
        )
    )
