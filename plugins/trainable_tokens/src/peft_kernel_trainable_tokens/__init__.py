"""Trainable Tokens for peft-kernel. The entry module is :mod:`peft_kernel_trainable_tokens.plugin`."""

from peft_kernel_trainable_tokens.config import TrainableTokensConfig

__all__ = ["TrainableTokensConfig"]
