"""``PeftModel.create_or_update_model_card``: the ``README.md`` model card HF PEFT writes next to an
adapter, so the Hub lists it as an adapter of its base model."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

FRAMEWORK_HEADING = "### Framework versions"


def _tags(peft_model: Any) -> set[str]:
    from peft_kernel.tuner import AdapterModel

    base = peft_model.get_base_model()
    tags = set(getattr(base, "model_tags", None) or [])
    if _is_pretrained(base) and isinstance(peft_model.base_model, AdapterModel):  # a tuner wraps a transformers model
        tags.add("transformers")
    peft_type = peft_model.active_peft_config.peft_type
    # HF PEFT tags LoRA adapters "lora"; the kernel names no method, so every method gets its own tag
    tags.add(str(getattr(peft_type, "value", peft_type)).lower())
    if hasattr(peft_model.base_model, "name_or_path"):
        tags.add(f"base_model:adapter:{peft_model.base_model.name_or_path}")
    return tags


def _is_pretrained(model: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
               for cls in type(model).__mro__)


def update_model_card(peft_model: Any, output_dir: str | os.PathLike, pipeline_tag: str | None = None) -> None:
    """Create or update ``output_dir/README.md``: ``library_name: peft``, tags, ``base_model``, the
    ``pipeline_tag`` (``text-generation`` for causal LMs) when the card has none, and the framework versions."""
    from huggingface_hub import ModelCard, ModelCardData

    from peft_kernel import __version__
    from peft_kernel.config import FORMAT_VERSION
    from peft_kernel.tuner import AdapterModel

    filename = os.path.join(output_dir, "README.md")
    card = ModelCard.load(filename) if os.path.exists(filename) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    tags = _tags(peft_model)
    if tags:
        card.data["tags"] = sorted(tags)
    if not card.data.pipeline_tag and pipeline_tag:
        card.data.pipeline_tag = pipeline_tag
    model_config = AdapterModel.get_model_config(peft_model)
    if isinstance(model_config, dict) and model_config != {"model_type": "custom"} and "_name_or_path" in model_config:
        card.data["base_model"] = model_config["_name_or_path"]
    lines = card.text.splitlines()
    versions = [f"- PEFT {FORMAT_VERSION}", f"- peft-kernel {__version__}"]
    missing = [line for line in versions if line not in lines]
    if missing:
        if FRAMEWORK_HEADING in lines:
            at = lines.index(FRAMEWORK_HEADING) + 2
            lines[at:at] = missing
        else:
            lines.append(f"{FRAMEWORK_HEADING}\n\n" + "\n".join(missing))
    card.text = "\n".join(lines)
    card.save(filename)
