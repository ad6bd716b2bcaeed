"""``IA3Model``: the class of ``peft_model.base_model`` for (IA)^3 adapters (HF PEFT's name)."""

from peft_kernel.tuner import tuner_class

IA3Model = tuner_class("IA3Model")
