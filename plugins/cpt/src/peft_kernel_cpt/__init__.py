"""CPT (context-aware prompt tuning) for peft-kernel. The entry module is :mod:`peft_kernel_cpt.plugin`."""

from peft_kernel_cpt.config import CPTConfig

__all__ = ["CPTConfig"]
