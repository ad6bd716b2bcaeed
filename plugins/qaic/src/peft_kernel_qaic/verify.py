"""Checking the exported graph against PyTorch, without the card.

The reference is the *transformers* forward of the base model (its own attention, RoPE, masks)
with each targeted linear's output increased by ``x @ A^T @ (scaling * B)^T`` through forward hooks,
one prompt at a time with its own adapter -- independent of the export graph's code. It is
compared with what ``generate(..., runtime="onnxruntime", return_logits=True)`` returned: the
logits of every generated step (teacher-forced on the generated tokens) and the greedy tokens.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import attrs
import numpy as np
import torch
from torch import nn

from peft_kernel_qaic.adapters import LoraAdapter


def _hook(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, f: torch.Tensor | None):
    """A forward hook adding one module's adapter to its output (written from the formulas, not the graph's code)."""

    def hook(mod, inputs, output):
        x = inputs[0]
        embedding = isinstance(mod, nn.Embedding)
        delta = a.t()[x] @ b.t() if embedding else x.to(a.dtype) @ a.t() @ b.t()
        if f is not None:  # DoRA: f * (W x + s BA x) + bias
            base_bias = 0.0 if embedding or mod.bias is None else mod.bias
            delta = (f - 1) * (output - base_bias) + f * delta
        if bias is not None:
            delta = delta + bias
        return output + delta.to(output.dtype)

    return hook


@contextlib.contextmanager
def lora_hooks(model: nn.Module, adapter: LoraAdapter | None) -> Iterator[None]:
    """Add ``adapter``'s delta (LoRA, DoRA, ``lora_bias``, embedding LoRA) to the outputs of its
    target modules while inside the block."""
    handles = []
    if adapter is not None:
        modules = dict(model.named_modules())
        for name, (a, b) in adapter.weights.items():
            module = modules[name]
            module = getattr(module, "base_layer", module)
            hook = _hook(a, b, adapter.biases.get(name), adapter.dora.get(name))
            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@attrs.define
class VerifyReport:
    """Per prompt: the max |ORT - PyTorch| logit difference and whether greedy tokens agree."""

    max_abs_diff: list[float]
    tokens_match: list[bool]
    adapters: list[str]
    max_abs_logit: list[float] = attrs.field(factory=list)
    """Per prompt, the largest |logit| of the reference (to read the differences relative to it)."""

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff) if self.max_abs_diff else 0.0

    @property
    def ok(self) -> bool:
        return all(self.tokens_match)

    def __str__(self) -> str:
        rows = [
            f"  prompt {i} [{a}]: max|dlogit| = {d:.2e}, greedy tokens {'match' if m else 'DIFFER'}"
            for i, (a, d, m) in enumerate(zip(self.adapters, self.max_abs_diff, self.tokens_match))
        ]
        scale = max(self.max_abs_logit) if self.max_abs_logit else 0.0
        return "\n".join([f"ONNX Runtime vs PyTorch: worst {self.worst:.2e} (largest |logit| {scale:.1f})", *rows])


def verify_generation(
    model: nn.Module,
    adapters: dict[str, LoraAdapter],
    prompt_ids: Sequence[Sequence[int]],
    mapping: Sequence[str],
    generated: Sequence[Sequence[int]],
    logits: Sequence[np.ndarray],
) -> VerifyReport:
    diffs, matches, scales = [], [], []
    for prompt, name, gen, got in zip(prompt_ids, mapping, generated, logits):
        full = torch.tensor([list(prompt) + list(gen)])
        with torch.no_grad(), lora_hooks(model, adapters.get(name)):
            ref = model(full).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(gen)].float().numpy()
        diffs.append(float(np.abs(ref - got).max()))
        scales.append(float(np.abs(ref).max()))
        # greedy on the reference logits (teacher-forced on the same tokens) must pick the same tokens
        matches.append(ref.argmax(-1).tolist() == list(gen))
    return VerifyReport(max_abs_diff=diffs, tokens_match=matches, adapters=list(mapping), max_abs_logit=scales)


def verify(qeff: Any, tokenizer: Any = None, prompts: Sequence[str] | None = None, prompt_to_adapter_mapping=None,
           generation_len: int | None = 8, prompt_token_ids=None) -> VerifyReport:
    """Run ``qeff.generate`` on ONNX Runtime and compare every step with the PyTorch reference."""
    res = qeff.generate(tokenizer, prompts, prompt_to_adapter_mapping, generation_len=generation_len,
                        runtime="onnxruntime", return_logits=True, prompt_token_ids=prompt_token_ids)
    from peft_kernel_qaic.base import as_prompt_list

    items = as_prompt_list(prompts, prompt_token_ids)
    ids = items if prompt_token_ids is not None else qeff._tokenize(tokenizer, items)
    return verify_generation(qeff.model, dict(qeff.adapters), ids, res.prompt_to_adapter_mapping, res.generated_ids, res.logits)
