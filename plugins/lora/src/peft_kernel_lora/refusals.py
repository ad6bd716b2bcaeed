"""Why some ``LoraConfig`` fields are refused (see ``config.UNSUPPORTED_FIELDS``): appended to the
error naming the field, so a user learns what the feature needs, not only that it is missing."""

from __future__ import annotations

REASONS: dict[str, str] = {
    "use_qalora": (
        "QALoRA adapts GPTQ-quantised linear layers (the QuantLinear of auto-gptq / gptqmodel), pooling the "
        "input over qalora_group_size columns to match the quantisation groups; peft-kernel wraps no GPTQ "
        "layers, and neither auto-gptq nor gptqmodel (packages of CUDA kernels) is installed with it. On unquantised layers HF PEFT computes plain LoRA: use "
        "use_qalora=False there"
    ),
    "megatron_config": (
        "Megatron-LM tensor parallelism needs LoRA layers for megatron.core's ColumnParallelLinear / "
        "RowParallelLinear (lora_A / lora_B sharded over the tensor-parallel group, built from megatron_core's "
        "ModelParallelConfig); peft-kernel has no such layers and megatron.core is not installed with it"
    ),
}


def explain(field: str, shown: str) -> str:
    """``shown`` (``"field=value"``) with the reason ``field`` is refused, where one is known."""
    reason = REASONS.get(field)
    return f"{shown} ({reason})" if reason else shown
