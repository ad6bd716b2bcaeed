"""Entry module of peft-kernel-loha: registers LoHa and builds its layers. Cheap to import."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.markers import hookimpl
from peft_kernel.records import MethodRecord
from peft_kernel_loha.config import LoHaConfig

_QV = ["q_proj", "v_proj"]
DEFAULT_TARGET_MODULES = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": _QV,
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": _QV,
    "gptj": _QV,
    "gpt_neox": ["query_key_value"],
    "gpt_neo": _QV,
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": _QV,
    "llama4": _QV,
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": _QV,
    "mixtral": _QV,
    "stablelm": _QV,
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": _QV,
    "gemma2": _QV,
    "gemma3_text": _QV,
    "qwen2": _QV,
    "qwen3": _QV,
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}
"""HF PEFT's model-type defaults for LoHa (its LoHa and LoKr tables are the same)."""


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="LOHA",
            config_class=LoHaConfig,
            prefix="hada_",
            capabilities={"mergeable", "mixed_batch", "hotswap", "multi_adapter"},
            tuner_name="LoHaModel",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={
                "LoHaModel": "peft_kernel_loha.tuner:LoHaModel",
                "LoHaLayer": "peft_kernel_loha.layers:LoHaLayer",
            },
        )
    )


@hookimpl
def peft_kernel_create_layer(config: Any, adapter_name: str, base_layer: Any, module_name: str) -> Any:
    if not isinstance(config, LoHaConfig):
        return None
    from peft_kernel_loha.layers import make_layer

    return make_layer(config, adapter_name, base_layer, module_name)
