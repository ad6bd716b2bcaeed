"""The task classes' ``task_ids`` argument: handed on to hosts that declare ``takes_task_ids``,
dropped for the others (as HF PEFT drops it for methods without tasks)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from core_toy import ToyConfig, make_stack

from peft_kernel import get_peft_model
from peft_kernel.model import PeftModelForFeatureExtraction


@pytest.mark.parametrize("takes", [False, True])
def test_task_ids_reach_only_hosts_that_take_them(takes: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model = get_peft_model(make_stack(), ToyConfig(target_modules=["q"]))
    seen: dict[str, Any] = {}

    def serve(args: tuple, kwargs: dict, adapter_names: Any) -> None:
        seen.update(kwargs)

    monkeypatch.setattr(model._host, "serve", serve)
    if takes:
        monkeypatch.setattr(model._host, "takes_task_ids", True, raising=False)
    task_ids = torch.tensor([1, 0])
    PeftModelForFeatureExtraction.forward(model, input_ids=torch.zeros(2, 3, dtype=torch.long), task_ids=task_ids)
    assert ("task_ids" in seen) is takes
    if takes:
        assert seen["task_ids"] is task_ids
