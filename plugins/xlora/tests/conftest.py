"""LoRA experts on the tiny Llama with random non-zero weights, saved once per session."""

from __future__ import annotations

import pytest
import torch
from xlora_support import EXPERT_TARGETS

from peft_kernel import LoraConfig, get_peft_model
from peft_kernel_testing import make_model


@pytest.fixture(scope="session")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``{"0": folder, "1": folder, "2": folder}``: LoRA adapters with random non-zero weights.
    The keys are positions because HF PEFT 0.21.2 runs X-LoRA only with such keys (see the tests)."""
    root = tmp_path_factory.mktemp("experts")
    folders = {}
    for i, targets in enumerate(EXPERT_TARGETS):
        torch.manual_seed(100 + i)
        model = get_peft_model(make_model("llama"), LoraConfig(r=2 + i, lora_alpha=4, target_modules=targets,
                                                               init_lora_weights=False))
        model.save_pretrained(root / str(i))
        folders[str(i)] = str(root / str(i))
    return folders
