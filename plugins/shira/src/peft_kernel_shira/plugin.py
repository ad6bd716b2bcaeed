"""Entry module of peft-kernel-shira: the method is a declaration. Keep it cheap (no torch)."""

from __future__ import annotations

from typing import Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_shira.config import ShiraConfig

SHIRA_TARGET_MODULES = {**DEFAULT_TARGET_MODULES, "phi": ["q_proj", "v_proj"]}
"""HF PEFT's defaults for SHiRA: the low-rank table, except Phi's attention projections only."""


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="SHIRA",
            config_class=ShiraConfig,
            prefix="shira_",
            capabilities={"additive", "mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="ShiraModel",
            layer_factory="peft_kernel_shira.layers:make_layer",
            default_target_modules=SHIRA_TARGET_MODULES,
            exports={"ShiraLayer": "peft_kernel_shira.layers:ShiraLayer"},
        )
    )
