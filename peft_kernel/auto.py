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
    def _base_class(cls, config: PeftConfig, import_allowlist: list[str]) -> Any:
        transformers = importlib.import_module("transformers")
        if cls._target_class is not None:
            return getattr(transformers, cls._target_class)
        if config.task_type in _AUTO_FOR_TASK:
            return getattr(transformers, _AUTO_FOR_TASK[config.task_type])
        mapping = config.auto_mapping or {}
        if mapping.get("base_model_class"):
            library = mapping.get("parent_library") or "transformers"
            if not any(library == allowed or library.startswith(f"{allowed}.") for allowed in import_allowlist):
                raise ValueError(
                    f"The auto mapping wants to import '{library}' which is not in the import allowlist. "
                    "If you are sure that importing this library is safe, specify "
                    f"`import_allowlist=['{library}']` in `from_pretrained()`."
                )
            return getattr(importlib.import_module(library), mapping["base_model_class"])
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
        import_allowlist: list[str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base model named in the adapter's config, then the adapter.

        ``kwargs`` that :meth:`PeftModel.from_pretrained` takes (Hub access, ``key_mapping``,
        ``autocast_adapter_dtype``...) go to it; Hub access keywords also reach the base model, and
        every other keyword (``dtype``, ``device_map``, ``attn_implementation``...) goes to the base
        model's ``from_pretrained`` only. ``import_allowlist`` (default: diffusers, lerobot,
        megatron-core, transformers) limits which library an adapter's ``auto_mapping`` may import."""
        allowlist = DEFAULT_IMPORT_ALLOWLIST if import_allowlist is None else list(import_allowlist)
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        config_hub = {k: v for k, v in hub.items() if k in ("cache_dir", "token", "local_files_only")}
        if hub.get("use_auth_token") is not None:
            config_hub.setdefault("token", hub["use_auth_token"])
        peft_config = PeftConfig.from_pretrained(pretrained_model_name_or_path, subfolder=hub.get("subfolder"),
                                                 revision=revision, **config_hub)
        if not peft_config.base_model_name_or_path:
            raise ValueError(f"{pretrained_model_name_or_path!s}: adapter_config.json names no base_model_name_or_path")
        adapter_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _ADAPTER_KWARGS}
        adapter_kwargs.update(hub)
        base_kwargs = {k: v for k, v in kwargs.items() if k not in ("subfolder", "use_auth_token")}
        if kwargs.get("use_auth_token") is not None:
            base_kwargs.setdefault("token", kwargs["use_auth_token"])
        if "low_cpu_mem_usage" in adapter_kwargs:  # a transformers keyword too, as HF PEFT passes it
            base_kwargs["low_cpu_mem_usage"] = adapter_kwargs["low_cpu_mem_usage"]
        base = cls._base_class(peft_config, allowlist).from_pretrained(
            peft_config.base_model_name_or_path, revision=peft_config.revision, **base_kwargs
        )
        peft_cls = cls._target_peft_class
        if peft_cls is PeftModel:
            peft_cls = TASK_CLASSES.get(peft_config.task_type, PeftModel)
        if revision is not None:
            adapter_kwargs["revision"] = revision
        return peft_cls.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                        is_trainable=is_trainable, config=config, **adapter_kwargs)


DEFAULT_IMPORT_ALLOWLIST = ["diffusers", "lerobot", "megatron-core", "transformers"]
"""Libraries an adapter config's ``auto_mapping`` may import by default (HF PEFT's list)."""

_HUB_KWARGS = ("cache_dir", "token", "local_files_only", "subfolder", "use_auth_token")
_ADAPTER_KWARGS = ("autocast_adapter_dtype", "ephemeral_gpu_offload", "key_mapping", "allow_pickle", "torch_device",
                   "ignore_mismatched_sizes", "low_cpu_mem_usage")


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
