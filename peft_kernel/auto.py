"""``AutoPeftModel*``: load the base model named in an adapter's config, then the adapter."""

from __future__ import annotations

import importlib
import os
from typing import Any

from peft_kernel.config import PeftConfig
from peft_kernel.enums import TaskType
from peft_kernel.model import (
    TASK_CLASSES,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

_AUTO_FOR_TASK = {
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
    TaskType.QUESTION_ANS: "AutoModelForQuestionAnswering",
    TaskType.FEATURE_EXTRACTION: "AutoModel",
}


class AutoPeftModel:
    """``AutoPeftModel.from_pretrained(adapter_path)`` loads base model + adapter in one call."""

    _target_class: str | None = None
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(...)")

    @classmethod
    def _base_class(cls, config: PeftConfig) -> Any:
        transformers = importlib.import_module("transformers")
        if cls._target_class is not None:
            return getattr(transformers, cls._target_class)
        if config.task_type in _AUTO_FOR_TASK:
            return getattr(transformers, _AUTO_FOR_TASK[config.task_type])
        mapping = config.auto_mapping or {}
        if mapping.get("base_model_class"):
            return getattr(importlib.import_module(mapping.get("parent_library") or "transformers"), mapping["base_model_class"])
        raise ValueError(
            "cannot tell which base model class to load: the adapter config has no task_type and no auto_mapping; "
            "load the base model yourself and use PeftModel.from_pretrained(model, path)."
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        peft_config = PeftConfig.from_pretrained(pretrained_model_name_or_path, revision=revision)
        if not peft_config.base_model_name_or_path:
            raise ValueError(f"{pretrained_model_name_or_path!s}: adapter_config.json names no base_model_name_or_path")
        base_kwargs = {k: kwargs.pop(k) for k in ("torch_dtype", "dtype", "device_map", "trust_remote_code") if k in kwargs}
        base = cls._base_class(peft_config).from_pretrained(peft_config.base_model_name_or_path, revision=peft_config.revision, **base_kwargs)
        peft_cls = cls._target_peft_class
        if peft_cls is PeftModel:
            peft_cls = TASK_CLASSES.get(peft_config.task_type, PeftModel)
        return peft_cls.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                        is_trainable=is_trainable, config=config, **kwargs)


def _auto(name: str, target: str, peft_cls: type[PeftModel]) -> type[AutoPeftModel]:
    return type(name, (AutoPeftModel,), {"_target_class": target, "_target_peft_class": peft_cls, "__module__": __name__})


AutoPeftModelForCausalLM = _auto("AutoPeftModelForCausalLM", "AutoModelForCausalLM", PeftModelForCausalLM)
AutoPeftModelForSeq2SeqLM = _auto("AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM", PeftModelForSeq2SeqLM)
AutoPeftModelForSequenceClassification = _auto(
    "AutoPeftModelForSequenceClassification", "AutoModelForSequenceClassification", PeftModelForSequenceClassification
)
AutoPeftModelForTokenClassification = _auto(
    "AutoPeftModelForTokenClassification", "AutoModelForTokenClassification", PeftModelForTokenClassification
)
AutoPeftModelForQuestionAnswering = _auto(
    "AutoPeftModelForQuestionAnswering", "AutoModelForQuestionAnswering", PeftModelForQuestionAnswering
)
AutoPeftModelForFeatureExtraction = _auto("AutoPeftModelForFeatureExtraction", "AutoModel", PeftModelForFeatureExtraction)
