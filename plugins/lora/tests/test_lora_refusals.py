"""Refused LoRA fields say why: QALoRA needs GPTQ-quantised layers, Megatron needs megatron.core."""

from __future__ import annotations

import pytest

import peft_kernel as pk
from peft_kernel.plugin_api import UnsupportedFeatureError
from peft_kernel_testing import make_model


def test_use_qalora_is_refused_naming_gptq():
    config = pk.LoraConfig(target_modules=["q_proj"], use_qalora=True)
    with pytest.raises(UnsupportedFeatureError, match=r"use_qalora=True \(QALoRA adapts GPTQ-quantised .*auto-gptq"):
        pk.get_peft_model(make_model("llama"), config)


def test_megatron_config_is_refused_naming_megatron_core():
    config = pk.LoraConfig(target_modules=["q_proj"], megatron_config={"tensor_model_parallel_size": 2})
    with pytest.raises(UnsupportedFeatureError, match=r"megatron_config=.*ColumnParallelLinear.*megatron\.core is not"):
        pk.get_peft_model(make_model("llama"), config)
