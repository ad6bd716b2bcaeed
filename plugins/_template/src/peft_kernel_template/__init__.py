"""TEMPLATE for peft-kernel. The entry module is :mod:`peft_kernel_template.plugin`."""

from peft_kernel_template.config import TemplateConfig

__all__ = ["TemplateConfig"]
