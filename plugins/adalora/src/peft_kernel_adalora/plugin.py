"""Entry module of peft-kernel-adalora: the method is a declaration plus three hooks. Keep it cheap (no torch)."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, UnsupportedFeatureError, hookimpl
from peft_kernel_adalora.config import FACTORS, AdaLoraConfig


class AdaLoraCombineError(UnsupportedFeatureError, TypeError):
    """``add_weighted_adapter`` on AdaLoRA adapters (HF PEFT raises ``TypeError``)."""


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="ADALORA",
            config_class=AdaLoraConfig,
            # HF's AdaLoRA keys share LoRA's "lora_" (lora_A, lora_B); "lora_E" marks AdaLoRA's alone
            prefix="lora_E",
            capabilities={"additive", "mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="AdaLoraModel",
            tuner_mixin="peft_kernel_adalora.tuner:AdaLoraTuner",
            layer_factory="peft_kernel_adalora.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={
                "AdaLoraLayer": "peft_kernel_adalora.layers:SVDLayer",
                "SVDLinear": "peft_kernel_adalora.layers:SVDLinear",
                "RankAllocator": "peft_kernel_adalora.allocator:RankAllocator",
            },
        )
    )


@hookimpl
def peft_kernel_training_step(model: Any, global_step: int) -> None:
    """Rank reallocation after each optimizer step, for a model training an AdaLoRA adapter."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not any(isinstance(c, AdaLoraConfig) for c in configs.values()):
        return
    host = getattr(model, "base_model", model)
    if getattr(host, "rankallocator", None) is not None:
        host.update_and_allocate(global_step)


@hookimpl
def peft_kernel_map_state_dict(config: Any, state_dict: dict[str, Any], direction: str) -> dict[str, Any] | None:
    """On save, keep only the triplets ``rank_pattern`` keeps (HF PEFT's checkpoint after rank
    reallocation: ``lora_A`` rows, ``lora_E`` entries and ``lora_B`` columns of the kept triplets)."""
    if direction != "save" or not isinstance(config, AdaLoraConfig) or not config.rank_pattern:
        return None
    masks = {key.rsplit(".lora_E", 1)[0]: [i for i, keep in enumerate(kept) if keep]
             for key, kept in config.rank_pattern.items()}
    out = {}
    for key, tensor in state_dict.items():
        module, _, factor = key.rpartition(".")
        found = [m for m in masks if factor in FACTORS and (module == m or module.endswith(f".{m}"))]
        if found:
            index = masks[max(found, key=len)]  # the longest path: "a.lin0" over "lin0"
            if factor == "lora_B" and tensor.shape[1] != len(index):
                tensor = tensor[:, index]
            elif factor != "lora_B" and tensor.shape[0] != len(index):
                tensor = tensor[index]
        out[key] = tensor
    return out


@hookimpl
def peft_kernel_combine_adapters(config: Any, adapters: list[str]) -> Any:
    if isinstance(config, AdaLoraConfig):
        raise AdaLoraCombineError("AdaLoraModel does not support add_weighted_adapter method: AdaLoRA adapters "
                                  "cannot be combined (as in HF PEFT).")
    return None
