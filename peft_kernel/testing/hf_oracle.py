"""Checks against HF ``peft`` that method plugins share (HF is the oracle in tests only)."""

from __future__ import annotations

import tempfile
from typing import Any, Callable, Sequence

import pytest
import torch
from torch import nn

from peft_kernel.testing.models import make_inputs, make_model, output_tensor


def perturb(model: nn.Module, seed: int, scale: float = 0.2) -> None:
    """Deterministic noise added to every trainable tensor (the adapters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def run(model: nn.Module, inputs: dict[str, Any], **kwargs: Any) -> torch.Tensor:
    """The model's main output tensor, without gradients."""
    with torch.no_grad():
        return output_tensor(model(**inputs, **kwargs)).detach().clone()


def check_mixed_batch_against_hf(
    kind: str,
    hf_config: Callable[[], Any],
    randomize: Callable[[nn.Module, int], None] = perturb,
    names: Sequence[str] = ("second", "__base__", "first", "second"),
    tolerance: float = 1e-5,
) -> None:
    """HF peft builds adapters ``first`` and ``second`` and saves them; ours loads both and serves
    one mixed batch; every row must equal HF's output with that row's adapter active (HF itself
    ignores ``adapter_names`` for most methods, so single-adapter runs are the reference)."""
    peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")
    from peft_kernel import PeftModel

    inputs = make_inputs(kind)
    hf = peft.get_peft_model(make_model(kind), hf_config(), adapter_name="first")
    hf.add_adapter("second", hf_config())
    for seed, name in enumerate(("first", "second")):
        hf.set_adapter(name)
        randomize(hf, 3 + seed)
    hf.eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        expected = {}
        for name in ("first", "second"):
            hf.set_adapter(name)
            expected[name] = run(hf, inputs)
        with hf.disable_adapter():
            expected["__base__"] = run(hf, inputs)
        ours = PeftModel.from_pretrained(make_model(kind), f"{tmp}/first", adapter_name="first")
        ours.load_adapter(f"{tmp}/second", adapter_name="second")
    mixed = run(ours.eval(), inputs, adapter_names=list(names))
    for row, name in enumerate(names):
        diff = (mixed[row] - expected[name][row]).abs().max().item()
        assert diff <= tolerance, f"mixed row {row} ({name}) vs HF single-adapter run: {diff:.2e}"
