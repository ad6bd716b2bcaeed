"""Entry module of peft-kernel-randlora: the method is a declaration plus the hooks for its shared
bases. Keep it cheap: torch is imported inside the hooks, for RandLora configs only."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_randlora.config import RandLoraConfig

SHARED = ("randlora_A", "randlora_B")
"""The model-level bases: saved as ``base_model.randlora_A`` / ``base_model.randlora_B``."""
PER_LAYER = "randlora_lambda"
"""A tensor every RandLora layer saves: marks the layers' paths in a checkpoint."""


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="RANDLORA",
            config_class=RandLoraConfig,
            prefix="randlora_",
            capabilities={"additive", "mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="RandLoraModel",
            layer_factory="peft_kernel_randlora.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={"RandLoraLinear": "peft_kernel_randlora.layers:RandLoraLinear"},
        )
    )


@hookimpl
def peft_kernel_prepare_config(config: Any, model: Any) -> None:
    if isinstance(config, RandLoraConfig):
        from peft_kernel_lowrank.projections import check_same_settings
        from peft_kernel_randlora.layers import SETTINGS, RandLoraLinear

        check_same_settings(model, RandLoraLinear, config, SETTINGS)


@hookimpl
def peft_kernel_create_shared_tensors(config: Any, adapter_name: str, targets: list[tuple[str, Any]]) -> Any:
    if not isinstance(config, RandLoraConfig):
        return None
    from peft_kernel_randlora.layers import make_bases

    return make_bases(config, targets)


@hookimpl
def peft_kernel_map_state_dict(config: Any, state_dict: dict[str, Any], direction: str) -> Any:
    """HF PEFT's RandLora checkpoints hold the bases at the model *and*, again, under every layer
    (``<layer>.randlora_A``): saved so, and the per-layer copies dropped on load (every layer uses
    the model's). ``save_projection=False`` leaves all of them out, as HF PEFT does."""
    if not isinstance(config, RandLoraConfig):
        return None
    from peft_kernel_lowrank.projections import without_keys

    layers = [k[: -len(PER_LAYER)] for k in state_dict if k.endswith("." + PER_LAYER)]
    if direction == "load":
        copies = {layer + name for layer in layers for name in SHARED}
        return {k: v for k, v in state_dict.items() if k not in copies} if copies & state_dict.keys() else None
    if not config.save_projection:
        return without_keys(state_dict, SHARED)
    shared = {k.rpartition(".")[2]: v for k, v in state_dict.items() if k.rpartition(".")[2] in SHARED}
    if not layers or not shared:
        return None
    return {**state_dict, **{layer + name: tensor for layer in layers for name, tensor in shared.items()}}
