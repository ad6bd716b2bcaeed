"""Entry module of peft-kernel-boft: registers BOFT and declares its layers. Cheap to import."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_boft.config import BOFTConfig
from peft_kernel_boft.single_factor import fill_missing_factors


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="BOFT",
            config_class=BOFTConfig,
            prefix="boft_",
            capabilities={"mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="BOFTModel",
            layer_factory="peft_kernel_boft.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={"BOFTLayer": "peft_kernel_boft.layers:BOFTLayer"},
        )
    )


@hookimpl
def peft_kernel_map_state_dict(config: Any, state_dict: dict[str, Any], direction: str) -> dict[str, Any] | None:
    """On load, single-factor ``boft_R`` tensors of HF PEFT's extension-less fallback get identity
    factors for the rest (:mod:`peft_kernel_boft.single_factor`)."""
    if direction != "load" or not isinstance(config, BOFTConfig):
        return None
    return fill_missing_factors(config, state_dict)
