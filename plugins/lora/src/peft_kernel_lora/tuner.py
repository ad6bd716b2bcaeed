"""``LoraModel``: the class of ``peft_model.base_model`` for LoRA adapters (HF PEFT's name)."""

from peft_kernel.tuner import tuner_class

LoraModel = tuner_class("LoraModel")
