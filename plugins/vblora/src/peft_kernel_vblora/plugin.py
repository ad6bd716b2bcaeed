"""Entry module of peft-kernel-vblora: the method's declaration and the two hooks a declaration
cannot say (the vector bank shared by every layer, the ``save_only_topk_weights`` format). Keep it
cheap: the hooks import their torch modules on first use."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_vblora.config import VBLoRAConfig

_ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
VBLORA_TARGET_MODULES = {
    **{name: DEFAULT_TARGET_MODULES[name] for name in (
        "bert", "bloom", "deberta", "gemma", "gemma2", "gemma3_text", "gemma4", "gpt2", "gpt_bigcode", "gpt_neo",
        "gpt_neox", "gptj", "llama", "llama4", "nemotron_h", "qwen2", "qwen3", "roberta")},
    "bart": _ALL_PROJECTIONS,
    "opt": _ALL_PROJECTIONS,
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}
"""HF PEFT's defaults for VB-LoRA: LoRA's for fewer model types, all projections for some."""


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="VBLORA",
            config_class=VBLoRAConfig,
            prefix="vblora_",
            capabilities={"additive", "mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="VBLoRAModel",
            tuner_mixin="peft_kernel_vblora.tuner:VBLoRATunerMethods",
            layer_factory="peft_kernel_vblora.layers:make_layer",
            default_target_modules=VBLORA_TARGET_MODULES,
            exports={"VBLoRALinear": "peft_kernel_vblora.layers:VBLoRALinear"},
        )
    )


@hookimpl
def peft_kernel_create_shared_tensors(config: Any, adapter_name: str, targets: list[tuple[str, Any]]) -> dict[str, Any] | None:
    """The adapter's vector bank, one trainable tensor for all its layers."""
    if not isinstance(config, VBLoRAConfig):
        return None
    from peft_kernel_vblora.layers import make_vector_bank

    return {"vblora_vector_bank": make_vector_bank(config, targets)}


@hookimpl
def peft_kernel_map_state_dict(config: Any, state_dict: dict[str, Any], direction: str) -> dict[str, Any] | None:
    """``save_only_topk_weights``: logits become top-k weights and indices on save, and such a
    checkpoint's weights and indices become logits again on load (whatever its config says)."""
    if not isinstance(config, VBLoRAConfig):
        return None
    from peft_kernel_vblora import topk

    if direction == "save":
        return topk.logits_to_topk(state_dict, config.topk, config.num_vectors) if config.save_only_topk_weights else None
    return topk.topk_to_logits(state_dict, config.num_vectors)
