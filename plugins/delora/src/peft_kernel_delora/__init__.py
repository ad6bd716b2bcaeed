"""DeLoRA for peft-kernel. The entry module is :mod:`peft_kernel_delora.plugin`."""

from peft_kernel_delora.config import DeloraConfig

__all__ = ["DeloraConfig"]
