"""``LoHaModel``: the class of ``peft_model.base_model`` for LoHa adapters (HF PEFT's name)."""

from peft_kernel.tuner import tuner_class

LoHaModel = tuner_class("LoHaModel")
