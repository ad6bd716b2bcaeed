"""HF's recipe for adapters whose initialisation changes the base weights (PiSSA, OLoRA, CorDA,
LoRA-GA), run the same way on HF's model and ours: save the initial adapter, train, save the
trained one converted to plain LoRA on the original base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peft_kernel_testing.hf_oracle import perturb, run
from peft_kernel_testing.models import make_inputs


def train_and_save_converted(model: Any, folder: Path, label: str, kind: str, save_plain: bool = False) -> torch.Tensor:
    """Save ``<label>-init`` (with ``init_lora_weights=True`` in its config, as HF's docs do), train
    (perturb), save ``<label>-plain`` (if asked) and ``<label>-lora`` converted through
    ``path_initial_model_for_weight_conversion``; returns the trained model's output on
    ``make_inputs(kind)``."""
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True
    model.save_pretrained(folder / f"{label}-init")
    config.init_lora_weights = init
    perturb(model, 3)
    trained = run(model.eval(), make_inputs(kind))
    if save_plain:
        model.save_pretrained(folder / f"{label}-plain")
    model.save_pretrained(folder / f"{label}-lora", path_initial_model_for_weight_conversion=str(folder / f"{label}-init"))
    return trained
