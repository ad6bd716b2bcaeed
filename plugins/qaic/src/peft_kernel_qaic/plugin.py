"""Entry module of peft-kernel-qaic: registers the ``qaic`` backend. Cheap to import."""

from __future__ import annotations

from typing import Callable

from peft_kernel import BackendRecord, hookimpl

EXPORTS = {
    "QEffAutoLoraModelForCausalLM": "peft_kernel_qaic.lora_model:QEffAutoLoraModelForCausalLM",
    "QEffAutoPeftModelForCausalLM": "peft_kernel_qaic.peft_model:QEffAutoPeftModelForCausalLM",
    "apply_peft": "peft_kernel_qaic.finetune:apply_peft",
}


@hookimpl
def peft_kernel_register_backends(register: Callable[[BackendRecord], None]) -> None:
    register(
        BackendRecord(
            name="qaic",
            description=(
                "Qualcomm Cloud AI 100: multi-LoRA static ONNX export with KV cache, qaic-exec compile, "
                "and an ONNX Runtime (CPU) reference runtime"
            ),
            exports=EXPORTS,
        )
    )
