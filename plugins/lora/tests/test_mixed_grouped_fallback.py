"""The ``grouped`` mixed-batch kernel falls back to ``bmm`` where torch has no ``_grouped_mm``
(torch < 2.8, inside the supported range), instead of failing with AttributeError."""

from __future__ import annotations

import torch

from peft_kernel import get_peft_model
from peft_kernel_testing import make_model, max_abs_diff, perturb
from peft_kernel_lora import LoraConfig
from peft_kernel_lowrank import mixed


def test_grouped_kernel_without_grouped_mm_runs_bmm(monkeypatch):
    model = get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj", "v_proj"], r=4), "a")
    model.add_adapter("b", LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    perturb(model, 0)
    model.eval()
    ids = torch.randint(1, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    names = ["a", "b", "__base__", "a"]
    monkeypatch.setattr(mixed, "strategy", "bmm")
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=names).logits
    monkeypatch.setattr(mixed, "strategy", "grouped")
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=names).logits
    assert max_abs_diff(got, expected) <= 1e-5
