"""LN tuning for peft-kernel. The entry module is :mod:`peft_kernel_ln_tuning.plugin`."""

from peft_kernel_ln_tuning.config import LNTuningConfig

__all__ = ["LNTuningConfig"]
