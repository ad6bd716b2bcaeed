"""Checks for layers that cache values derived from an adapter across forwards (a dense
``delta W``, a rotation, a norm): a mixed batch and single-adapter runs stay equal to HF peft
running the same weights, also after the adapter's tensors are written in place."""

from __future__ import annotations

import tempfile
from typing import Any, Callable, Sequence

import torch
from torch import nn

from peft_kernel_testing.hf_oracle import hf_oracle, hf_peft, max_abs_diff, run
from peft_kernel_testing.models import make_inputs, make_model


def _adapter_tensors(model: nn.Module, adapter: str) -> list[torch.Tensor]:
    return [p for name, p in sorted(model.named_parameters()) if adapter in name.split(".") and p.is_floating_point()]


def _write(model: nn.Module, adapter: str, seed: int, scale: float) -> None:
    """An optimizer-step-like in-place write (``add_``) to every floating tensor of ``adapter``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in _adapter_tensors(model, adapter):
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def _hf_expected(ours: nn.Module, kind: str, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """HF peft's single-adapter outputs for adapters ``a`` and ``b`` as ``ours`` holds them now."""
    peft = hf_peft()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        with hf_oracle("HF peft loading our adapters"):
            hf = peft.PeftModel.from_pretrained(make_model(kind), f"{tmp}/a", adapter_name="a").eval()
            hf.load_adapter(f"{tmp}/b", adapter_name="b")
            expected = {}
            for name in ("a", "b"):
                hf.set_adapter(name)
                expected[name] = run(hf, inputs)
            with hf.disable_adapter():
                expected["__base__"] = run(hf, inputs)
    return expected


def check_cached_adapters_stay_fresh(kind: str, config: Callable[[], Any],
                                     names: Sequence[str] = ("b", "__base__", "a", "b"),
                                     scale: float = 0.1, tolerance: float = 1e-5) -> None:
    """Ours builds adapters ``a`` and ``b`` (``config()`` each, perturbed); three times — as
    built, after an in-place write to ``b``, after one to ``a`` — every row of a mixed batch
    (run twice: the second reuses the caches) and each single-adapter run equals HF peft loading
    the adapters as they are at that moment."""
    from peft_kernel import get_peft_model

    inputs = make_inputs(kind)
    ours = get_peft_model(make_model(kind), config(), adapter_name="a")
    ours.add_adapter("b", config())
    for seed, name in enumerate("ab"):
        _write(ours, name, seed, 0.2)
    ours.eval()
    for step, written in enumerate((None, "b", "a")):
        if written is not None:
            _write(ours, written, 10 + step, scale)
        expected = _hf_expected(ours, kind, inputs)
        for attempt in range(2):
            mixed = run(ours, inputs, adapter_names=list(names))
            for row, name in enumerate(names):
                diff = max_abs_diff(mixed[row], expected[name][row])
                assert diff <= tolerance, f"step {step} run {attempt}: mixed row {row} ({name}) vs HF: {diff:.2e}"
        for name in ("a", "b"):
            ours.set_adapter(name)
            diff = max_abs_diff(run(ours, inputs), expected[name])
            assert diff <= tolerance, f"step {step}: single {name} vs HF: {diff:.2e}"
