"""peft-kernel: parameter-efficient fine-tuning as a pluggy microkernel, drop-in for HF PEFT.

Public names load lazily, so ``import peft_kernel`` (and plugin entry modules importing
``peft_kernel.hookimpl``) stays cheap. Config classes and extra names that plugins register
(``LoraConfig``, ``LoraModel``...) are importable from here while their plugin is installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from peft_kernel.markers import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "PeftConfig": "peft_kernel.config",
    "PeftType": "peft_kernel.enums",
    "TaskType": "peft_kernel.enums",
    "MethodRecord": "peft_kernel.records",
    "BackendRecord": "peft_kernel.records",
    "AdapterLayer": "peft_kernel.layer",
    "AdapterModel": "peft_kernel.tuner",
    "ModulesToSaveWrapper": "peft_kernel.modules_to_save",
    "PeftModel": "peft_kernel.model",
    "PeftModelForCausalLM": "peft_kernel.model",
    "PeftModelForSeq2SeqLM": "peft_kernel.model",
    "PeftModelForSequenceClassification": "peft_kernel.model",
    "PeftModelForTokenClassification": "peft_kernel.model",
    "PeftModelForQuestionAnswering": "peft_kernel.model",
    "PeftModelForFeatureExtraction": "peft_kernel.model",
    "AutoPeftModel": "peft_kernel.auto",
    "AutoPeftModelForCausalLM": "peft_kernel.auto",
    "AutoPeftModelForSeq2SeqLM": "peft_kernel.auto",
    "AutoPeftModelForSequenceClassification": "peft_kernel.auto",
    "AutoPeftModelForTokenClassification": "peft_kernel.auto",
    "AutoPeftModelForQuestionAnswering": "peft_kernel.auto",
    "AutoPeftModelForFeatureExtraction": "peft_kernel.auto",
    "get_peft_model": "peft_kernel.mapping",
    "inject_adapter_in_model": "peft_kernel.mapping",
    "get_peft_model_state_dict": "peft_kernel.adapter_io",
    "set_peft_model_state_dict": "peft_kernel.adapter_io",
    "hotswap_adapter": "peft_kernel.adapter_io",
    "prepare_model_for_compiled_hotswap": "peft_kernel.utils.hotswap",
    "check_if_peft_model": "peft_kernel.helpers",
    "rescale_adapter_scale": "peft_kernel.helpers",
    "get_peft_config": "peft_kernel.mapping",
    "PEFT_TYPE_TO_CONFIG_MAPPING": "peft_kernel.mapping",
    "PEFT_TYPE_TO_TUNER_MAPPING": "peft_kernel.mapping",
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING": "peft_kernel.mapping",
    "PeftMixedModel": "peft_kernel.mixed_model",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING": "peft_kernel.mapping",
    "load_peft_weights": "peft_kernel.peft_weights",
    "get_base_model_state_dict": "peft_kernel.base_state_dict",
    "set_base_model_state_dict": "peft_kernel.base_state_dict",
    "get_layer_status": "peft_kernel.status",
    "get_model_status": "peft_kernel.status",
    "TunerLayerStatus": "peft_kernel.status",
    "TunerModelStatus": "peft_kernel.status",
    "prepare_model_for_kbit_training": "peft_kernel.training_utils",
    "cast_mixed_precision_params": "peft_kernel.training_utils",
    "shift_tokens_right": "peft_kernel.training_utils",
    "bloom_model_postprocess_past_key_value": "peft_kernel.legacy",
    "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING": "peft_kernel.legacy",
    "get_registry": "peft_kernel.plugins",
    "PeftKernelError": "peft_kernel.errors",
    "PluginError": "peft_kernel.errors",
    "UnknownMethodError": "peft_kernel.errors",
    "ConfigError": "peft_kernel.errors",
    "TargetNotFoundError": "peft_kernel.errors",
    "CheckpointError": "peft_kernel.errors",
    "AdapterNameError": "peft_kernel.errors",
    "MixedBatchError": "peft_kernel.errors",
    "PeftError": "peft_kernel.errors",
    "NoMatchingPeftModuleError": "peft_kernel.errors",
    "PeftWarning": "peft_kernel.errors",
}

__all__ = ["hookimpl", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name.startswith("__"):
        raise AttributeError(name)
    from peft_kernel.plugins import get_registry

    registry = get_registry()
    if name in registry.tuner_names():
        from peft_kernel.tuner import tuner_class

        record = next(r for r in registry.methods.values() if r.tuner_name == name)
        return tuner_class(name, record.tuner_mixin)
    try:
        return registry.export(name)
    except AttributeError:
        raise AttributeError(
            f"module 'peft_kernel' has no attribute {name!r}; if it is a method's class, install the plugin "
            "that provides it (`peft-kernel list-plugins` shows what is installed)."
        ) from None


def __dir__() -> list[str]:
    from peft_kernel.plugins import get_registry

    return sorted({*globals(), *_LAZY, *get_registry().exported_names()})
