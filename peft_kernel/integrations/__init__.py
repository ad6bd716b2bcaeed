"""Integrations with training libraries. Each submodule imports its library only when imported
itself, so ``import peft_kernel`` stays light (``peft_kernel.integrations.transformers`` needs
transformers and accelerate)."""
