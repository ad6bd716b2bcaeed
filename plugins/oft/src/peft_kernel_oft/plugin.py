"""Entry module of peft-kernel-oft: registers OFT and builds its layers. Cheap to import."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.markers import hookimpl
from peft_kernel.records import MethodRecord
from peft_kernel_oft.config import OFTConfig

# HF PEFT's defaults per transformers ``model_type`` (used when target_modules is unset).
DEFAULT_TARGET_MODULES = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="OFT",
            config_class=OFTConfig,
            prefix="oft_",
            capabilities={"mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="OFTModel",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={
                "OFTModel": "peft_kernel_oft.tuner:OFTModel",
                "OFTLayer": "peft_kernel_oft.layers:OFTLayer",
                "OFTRotationModule": "peft_kernel_oft.rotation:OFTRotationModule",
            },
        )
    )


@hookimpl
def peft_kernel_create_layer(config: Any, adapter_name: str, base_layer: Any, module_name: str) -> Any:
    if not isinstance(config, OFTConfig):
        return None
    from peft_kernel_oft.layers import make_layer

    return make_layer(config, adapter_name, base_layer, module_name)
