"""``OFTModel``: the class of ``peft_model.base_model`` for OFT adapters (HF PEFT's name)."""

from peft_kernel.tuner import tuner_class

OFTModel = tuner_class("OFTModel")
