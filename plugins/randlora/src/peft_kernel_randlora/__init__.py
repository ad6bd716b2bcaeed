"""RandLora for peft-kernel. The entry module is :mod:`peft_kernel_randlora.plugin`."""

from peft_kernel_randlora.config import RandLoraConfig

__all__ = ["RandLoraConfig"]
