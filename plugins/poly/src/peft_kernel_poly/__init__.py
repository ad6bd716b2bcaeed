"""Polytropon (Poly) for peft-kernel. The entry module is :mod:`peft_kernel_poly.plugin`."""

from peft_kernel_poly.config import PolyConfig

__all__ = ["PolyConfig"]
