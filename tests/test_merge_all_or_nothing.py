"""Merging is all or nothing: when one layer refuses (``safe_merge`` finding NaNs), the layers merged
before it in the same call are unmerged again, for ``merge_adapter`` and ``merge_and_unload``.
(Before, the earlier layers stayed merged: a model half merged, half not.)"""

from __future__ import annotations

import pytest
import torch

import peft_kernel as pk
from peft_kernel_testing import make_model, perturb


@pytest.mark.parametrize("call", ["merge_adapter", "merge_and_unload"])
def test_a_refusing_layer_leaves_no_layer_merged(call):
    model = pk.get_peft_model(make_model("mlp"), pk.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    perturb(model, 0, scale=0.5)
    inner = model.base_model.model
    with torch.no_grad():
        inner.lin1.lora_B["default"].weight[0, 0] = float("nan")
    before = {n: p.clone() for n, p in inner.named_parameters() if "lora" not in n}
    with pytest.raises(ValueError, match="NaN"):
        getattr(model, call)(safe_merge=True)
    assert not inner.lin0.merged_adapters and not inner.lin1.merged_adapters
    for name, param in inner.named_parameters():
        if name in before:
            torch.testing.assert_close(param, before[name], rtol=0, atol=1e-6)
