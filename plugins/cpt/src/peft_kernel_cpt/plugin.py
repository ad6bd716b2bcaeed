"""Entry module of peft-kernel-cpt: registers the method and builds its encoder. Cheap to import."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import MethodRecord, hookimpl
from peft_kernel_cpt.config import CPTConfig
from peft_kernel_prompt_learning import FAMILY_EXPORTS


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="CPT",
            config_class=CPTConfig,
            prefix="cpt_",
            capabilities={"prompt_learning", "mixed_batch", "multi_adapter"},
            exports={**FAMILY_EXPORTS, "CPTEmbedding": "peft_kernel_cpt.encoder:CPTEmbedding"},
        )
    )


@hookimpl
def peft_kernel_create_prompt_encoder(config: Any, adapter_name: str, model: Any, word_embeddings: Any) -> Any:
    if not isinstance(config, CPTConfig):
        return None
    from peft_kernel_cpt.encoder import CPTEmbedding

    return CPTEmbedding(config, word_embeddings)
