"""LoHa for peft-kernel. The entry module is :mod:`peft_kernel_loha.plugin`."""

from peft_kernel_loha.config import LoHaConfig

__all__ = ["LoHaConfig"]
