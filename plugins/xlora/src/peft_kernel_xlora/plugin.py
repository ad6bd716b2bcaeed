"""Entry module of peft-kernel-xlora: the X-LoRA record and its adapter host. Keep it cheap (no torch)."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import MethodRecord, hookimpl
from peft_kernel_xlora.config import XLoraConfig

PEFT_TYPE = "XLORA"


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type=PEFT_TYPE,
            config_class=XLoraConfig,
            prefix="internal_xlora_",
            exports={"XLoraModel": "peft_kernel_xlora.host:XLoraModel"},
        )
    )


@hookimpl
def peft_kernel_create_host(record: MethodRecord, model: Any, config: Any, adapter_name: str) -> Any:
    """X-LoRA's host wraps a LoRA tuner holding the experts (see :mod:`peft_kernel_xlora.host`)."""
    if record.peft_type != PEFT_TYPE:
        return None
    from peft_kernel_xlora.host import XLoraModel

    return XLoraModel(model, config, adapter_name)
