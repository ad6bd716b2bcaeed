"""C3A for peft-kernel. The entry module is :mod:`peft_kernel_c3a.plugin`."""

from peft_kernel_c3a.config import C3AConfig

__all__ = ["C3AConfig"]
