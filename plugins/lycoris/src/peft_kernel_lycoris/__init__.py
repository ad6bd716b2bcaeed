"""Shared pieces of the LyCORIS-family plugins (LoHa, LoKr).

This is a plain library: it registers no entry point and no method. ``peft-kernel-loha`` and
``peft-kernel-lokr`` depend on it, so neither method plugin imports the other. Torch-heavy code
lives in :mod:`peft_kernel_lycoris.layer`, imported only when a layer is built.
"""

from peft_kernel_lycoris.config import LycorisConfig

__all__ = ["LycorisConfig"]
