"""HF PEFT's ``VBLoRAModel`` methods, mixed into the generated ``VBLoRAModel`` tuner (the record's
``tuner_mixin``); a ``PeftModel`` reaches them through its ``base_model``."""

from __future__ import annotations

from typing import Any

from peft_kernel_vblora.topk import INDICES


class VBLoRATunerMethods:
    """``get_nb_savable_parameters`` / ``print_savable_parameters``: what a checkpoint of an adapter
    holds, counted in float32 values (``save_only_topk_weights`` indices count by their size)."""

    def get_nb_savable_parameters(self: Any, adapter: str = "default") -> tuple[int, int]:
        """``(VB-LoRA values, other values)`` that ``save_pretrained`` writes for ``adapter``: the
        bank and the logits (or the top-k weights, and the indices at ``bits / 32`` each), and
        whatever else the adapter saves (``modules_to_save`` copies, trained biases). HF PEFT counts
        every adapter's VB-LoRA tensors whichever ``adapter`` is asked for; this counts ``adapter``'s."""
        from peft_kernel import get_peft_model_state_dict

        vblora, other = 0.0, 0
        for key, tensor in get_peft_model_state_dict(self, adapter_name=adapter).items():
            if "vblora_" not in key:
                other += tensor.numel()
            elif key.endswith(INDICES):
                vblora += tensor.numel() * tensor.element_size() / 4
            else:
                vblora += tensor.numel()
        return int(vblora), other

    def print_savable_parameters(self: Any) -> None:
        """Print the counts of :meth:`get_nb_savable_parameters` for the default adapter, as HF PEFT."""
        vblora, other = self.get_nb_savable_parameters()
        print(f"VB-LoRA params to-be-saved (float32-equivalent): {vblora:,d} || total params to-be-saved: {vblora + other:,d}")
