"""Prefix tuning for peft-kernel. The entry module is :mod:`peft_kernel_prefix_tuning.plugin`."""

from peft_kernel_prefix_tuning.config import PrefixTuningConfig

__all__ = ["PrefixTuningConfig"]
