"""Helpers of the X-LoRA tests: X-LoRA models built by HF PEFT (the oracle) and by us from the same
LoRA experts (the ``experts`` fixture of ``conftest.py``) with the same classifier weights."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from peft_kernel import PeftModel, get_peft_model
from peft_kernel_testing import make_model
from peft_kernel_xlora import XLoraConfig

EXPERT_TARGETS = (["q_proj", "v_proj"], ["q_proj", "v_proj"], ["q_proj", "o_proj", "gate_proj"])
"""Three experts; the third targets other modules, so layers hold different subsets of experts."""
IDS = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 11, 12, 13]])
CLASSIFIER_PREFIX = "base_model.internal_xlora_classifier."


def xlora_kwargs(experts: dict[str, str], **overrides: Any) -> dict[str, Any]:
    """Small X-LoRA settings (a two-layer classifier without dropout, so outputs are deterministic)."""
    return {"task_type": "CAUSAL_LM", "hidden_size": 16, "adapters": dict(experts), "xlora_depth": 2,
            "xlora_size": 8, "xlora_dropout_p": 0.0, **overrides}


def llama(use_cache: bool = True) -> torch.nn.Module:
    model = make_model("llama")
    model.config.use_cache = use_cache  # HF PEFT's X-LoRA refuses a model with use_cache=True
    return model


def randomise_classifier(model: PeftModel, seed: int = 3, scale: float = 3.0) -> None:
    """Non-zero, large enough weights that the experts' scalings differ clearly per token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.base_model.internal_xlora_classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def classifier_state(model: Any) -> dict[str, torch.Tensor]:
    """The classifier's tensors under HF PEFT's keys, from either library's model."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(CLASSIFIER_PREFIX)}


def ours(experts: dict[str, str], seed: int = 3, **overrides: Any) -> PeftModel:
    model = get_peft_model(llama(), XLoraConfig(**xlora_kwargs(experts, **overrides)))
    randomise_classifier(model, seed)
    return model.eval()


def hf_twin(peft: Any, experts: dict[str, str], model: PeftModel, **overrides: Any) -> Any:
    """HF PEFT's X-LoRA model with ``model``'s classifier weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(llama(use_cache=False), peft.XLoraConfig(**xlora_kwargs(experts, **overrides)))
    hf.load_state_dict(classifier_state(model), strict=False)
    return hf.eval()


def logits(model: Any, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def save_hf_layout(hf: Any, folder: Path) -> None:
    """What HF PEFT's ``save_pretrained`` means to write for an X-LoRA model (it drops keys, see the
    checkpoint tests): the X-LoRA config, the whole classifier under HF's keys, the experts in sub-folders."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in classifier_state(hf).items()}, str(folder / "adapter_model.safetensors"))
    hf.peft_config["default"].save_pretrained(str(folder))
