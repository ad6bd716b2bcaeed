"""HRA for peft-kernel. The entry module is :mod:`peft_kernel_hra.plugin`."""

from peft_kernel_hra.config import HRAConfig

__all__ = ["HRAConfig"]
