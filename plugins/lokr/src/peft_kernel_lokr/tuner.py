"""``LoKrModel``: the class of ``peft_model.base_model`` for LoKr adapters (HF PEFT's name)."""

from peft_kernel.tuner import tuner_class

LoKrModel = tuner_class("LoKrModel")
