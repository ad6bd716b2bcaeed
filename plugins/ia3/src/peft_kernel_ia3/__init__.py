"""(IA)^3 for peft-kernel. The entry module is :mod:`peft_kernel_ia3.plugin`."""

from peft_kernel_ia3.config import IA3Config

__all__ = ["IA3Config"]
