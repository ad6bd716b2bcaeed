"""VeRA for peft-kernel. The entry module is :mod:`peft_kernel_vera.plugin`."""

from peft_kernel_vera.config import VeraConfig

__all__ = ["VeraConfig"]
