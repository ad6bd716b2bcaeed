"""Entry module of peft-kernel-vera: the method is a declaration plus the hooks for its shared
projections. Keep it cheap: torch is imported inside the hooks, for VeRA configs only."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_vera.config import VeraConfig

SHARED = ("vera_A", "vera_B")
"""The model-level projections: saved once, as ``base_model.vera_A`` / ``base_model.vera_B``."""


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="VERA",
            config_class=VeraConfig,
            prefix="vera_lambda_",
            capabilities={"additive", "mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="VeraModel",
            layer_factory="peft_kernel_vera.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={"VeraLinear": "peft_kernel_vera.layers:VeraLinear"},
        )
    )


@hookimpl
def peft_kernel_prepare_config(config: Any, model: Any) -> None:
    if isinstance(config, VeraConfig):
        from peft_kernel_lowrank.projections import check_same_settings
        from peft_kernel_vera.layers import SETTINGS, VeraLinear

        check_same_settings(model, VeraLinear, config, SETTINGS)


@hookimpl
def peft_kernel_create_shared_tensors(config: Any, adapter_name: str, targets: list[tuple[str, Any]]) -> Any:
    if not isinstance(config, VeraConfig):
        return None
    from peft_kernel_vera.layers import make_projections

    return make_projections(config, targets)


@hookimpl
def peft_kernel_map_state_dict(config: Any, state_dict: dict[str, Any], direction: str) -> Any:
    """``save_projection=False``: the projections are left out of checkpoints (rebuilt from
    ``projection_prng_key`` when the adapter is created again), as HF PEFT does."""
    if not isinstance(config, VeraConfig) or direction != "save" or config.save_projection:
        return None
    from peft_kernel_lowrank.projections import without_keys

    return without_keys(state_dict, SHARED)
