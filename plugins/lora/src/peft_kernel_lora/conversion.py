"""PiSSA / OLoRA -> plain LoRA on the original base (``save_pretrained(path_initial_model_for_weight_conversion=...)``).

PiSSA and OLoRA move ``s·B0A0`` out of the base weight at initialisation: the trained model is
``W_res + s·BA`` with ``W_res = W - s·B0A0``. On the original ``W`` the same model is
``W + s·(BA - B0A0)``, a LoRA of twice the rank: ``A' = [A; A0]``, ``B' = [B, -B0]``, with
``r`` and ``lora_alpha`` doubled so the scaling stays (``alpha·√2`` with rsLoRA). HF PEFT writes
exactly these tensors and config. A ``lora_B`` bias becomes ``b - b0``; tensors that are not LoRA
factors (``modules_to_save`` heads, trained biases) are written unchanged, where HF PEFT drops them.
"""

from __future__ import annotations

import warnings

import torch

from peft_kernel.plugin_api import CheckpointError
from peft_kernel_lora.config import LoraConfig

# on-disk key suffix -> how the trained and the initial tensor combine
_FACTORS = {
    ".lora_A.weight": "A",
    ".lora_embedding_A": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_B": "B",
    ".lora_B.bias": "bias",
}
_CONVERTIBLE_INITS = ("pissa", "corda", "olora", "lora_ga", "true")


def _kind(key: str) -> str | None:
    for suffix, kind in _FACTORS.items():
        if key.endswith(suffix):
            return kind
    return None


def convert_for_original_base(
    config: LoraConfig, state_dict: dict[str, torch.Tensor], initial_state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The trained adapter ``state_dict`` as a LoRA for the unmodified base model, and its config."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when "
            "using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`."
        )
    if config.use_dora:
        raise ValueError(
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported with "
            "use_dora=True: DoRA's magnitude is normalised against the modified base weight, which a plain LoRA "
            "on the original base cannot express."
        )
    if not str(config.init_lora_weights).lower().startswith(_CONVERTIBLE_INITS):
        warnings.warn(
            "`path_initial_model_for_weight_conversion` only works for converting a PiSSA/CorDA/OLoRA/LoRA-GA "
            "adapter to a LoRA adapter", UserWarning, stacklevel=3,
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        kind = _kind(key)
        if kind is None:
            out[key] = value
            continue
        if key not in initial_state_dict:
            raise CheckpointError(
                f"the initial adapter has no tensor {key!r}: was it saved from this adapter right after "
                "initialisation (same target modules)?"
            )
        initial = initial_state_dict[key].to(device=value.device, dtype=value.dtype)
        if kind == "A":
            out[key] = torch.cat([value, initial], dim=0)
        elif kind == "B":
            out[key] = torch.cat([value, -initial], dim=1)
        else:
            out[key] = value - initial
    converted = config.copy()
    converted.init_lora_weights = True
    converted.r = config.r * 2
    converted.lora_alpha = config.lora_alpha * (2**0.5 if config.use_rslora else 2)
    if config.rank_pattern:
        converted.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    if config.alpha_pattern:
        converted.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return out, converted
