"""Training through a mixed batch: each adapter's gradients equal HF peft's for the rows that use it.

Mixed batches run in eval mode (no dropout) with autograd on. HF peft serves ``adapter_names`` at
inference only, so the reference is HF's single-adapter runs:
for each adapter, the loss of its rows with it active. Ours runs the whole batch at once."""

from __future__ import annotations

import tempfile
from typing import Any, Callable, Sequence

import pytest
import torch

from peft_kernel_testing.hf_oracle import hf_oracle, hf_peft, perturb
from peft_kernel_testing.models import make_inputs, make_model, output_tensor


def only_path(monkeypatch: Any, layer_type: type, kernel: str) -> list[int]:
    """Make every mixed path but ``layer_type.<kernel>`` fail the test (the stacked, dense and
    grouped ones); the returned list grows by one per call of ``kernel``."""
    from peft_kernel.plugin_api import AdapterLayer
    from peft_kernel_lowrank import dense_mixed, mixed

    calls: list[int] = []
    wrapped = getattr(layer_type, kernel)
    monkeypatch.setattr(layer_type, kernel, lambda *a, **k: calls.append(1) or wrapped(*a, **k))
    for module, name in ((mixed, "mixed_forward"), (dense_mixed, "dense_mixed_forward"), (AdapterLayer, "mixed_forward")):
        monkeypatch.setattr(module, name, lambda *a, _name=name, **k: pytest.fail(f"another mixed path ran: {_name}"))
    return calls


def single_runs(model: Any, inputs: dict[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{adapter: output with it alone}`` for every name (``"__base__"``: adapters off)."""
    out = {}
    with torch.no_grad():
        for name in dict.fromkeys(names):
            if name == "__base__":
                with model.disable_adapter():
                    out[name] = output_tensor(model(**inputs))
            else:
                model.set_adapter(name)
                out[name] = output_tensor(model(**inputs))
    return out


def check_rows(model: Any, inputs: dict[str, Any], names: Sequence[str], atol: float = 1e-5) -> None:
    """Every row of the mixed batch equals that row of a run with its adapter alone (within ``atol``)."""
    expected = single_runs(model, inputs, names)
    with torch.no_grad():
        mixed = output_tensor(model(**inputs, adapter_names=list(names)))
    for row, name in enumerate(names):
        diff = float((mixed[row] - expected[name][row]).abs().max())
        assert diff <= atol, f"mixed row {row} ({name}) vs its single run: {diff:.2e}"


def _loss(out: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    return output_tensor(out)[list(rows)].float().pow(2).sum()


def check_mixed_gradients_against_hf(kind: str, hf_config: Callable[[], Any],
                                     names: Sequence[str] = ("second", "__base__", "first", "second"),
                                     tolerance: float = 1e-5) -> None:
    """HF builds adapters ``first`` and ``second`` (perturbed) and saves them; ours loads both as
    trainable and backpropagates the squared output of one mixed batch; every adapter tensor's
    gradient must equal HF's from its own rows with that adapter active (relative to the largest)."""
    peft = hf_peft()
    from peft_kernel import PeftModel

    inputs = make_inputs(kind)
    adapters = ("first", "second")
    with tempfile.TemporaryDirectory() as tmp:
        with hf_oracle("HF peft building two adapters and backpropagating each"):
            hf = peft.get_peft_model(make_model(kind), hf_config(), adapter_name="first")
            hf.add_adapter("second", hf_config())
            for seed, name in enumerate(adapters):
                hf.set_adapter(name)
                perturb(hf, 3 + seed)
            hf.save_pretrained(tmp)
            hf.eval()
            for name in adapters:
                hf.set_adapter(name)
                _loss(hf(**inputs), [i for i, n in enumerate(names) if n == name]).backward()
            expected = {k: p.grad for k, p in hf.named_parameters() if p.grad is not None}
        ours = PeftModel.from_pretrained(make_model(kind), f"{tmp}/first", adapter_name="first", is_trainable=True)
        ours.load_adapter(f"{tmp}/second", adapter_name="second", is_trainable=True)
    ours.eval()  # mixed batches are for eval mode; autograd still runs
    for key, p in ours.named_parameters():
        p.requires_grad_(key in expected)
    _loss(ours(**inputs, adapter_names=list(names)), range(len(names))).backward()
    got = {k: p.grad for k, p in ours.named_parameters() if p.grad is not None}
    assert expected and got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())[:4]
    for key, grad in expected.items():
        diff = float((got[key] - grad).abs().max()) / max(float(grad.abs().max()), 1.0)
        assert diff <= tolerance, f"{key}: gradient differs from HF's by {diff:.2e} (relative)"


def check_mixed_gradients_equal_single_runs(model: Any, inputs: dict[str, Any], names: Sequence[str], marker: str,
                                            atol: float = 1e-5) -> None:
    """Autograd through one mixed batch (eval mode) gives every adapter tensor (parameters whose name
    holds ``marker``) the gradient that single-adapter runs on its own rows give (summed over adapters)."""
    params = [p for n, p in model.named_parameters() if marker in n]

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return [torch.zeros_like(p) if g is None else g
                for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]

    for p in params:
        p.requires_grad_(True)
    mixed = grads(output_tensor(model(**inputs, adapter_names=list(names))).pow(2).sum())
    expected = [torch.zeros_like(p) for p in params]
    for name in dict.fromkeys(n for n in names if n != "__base__"):
        model.set_adapter(name)
        for p in params:
            p.requires_grad_(True)
        rows = [i for i, n in enumerate(names) if n == name]
        for total, g in zip(expected, grads(output_tensor(model(**inputs))[rows].pow(2).sum())):
            total += g
    for got, want in zip(mixed, expected):
        torch.testing.assert_close(got, want, atol=atol, rtol=atol)
