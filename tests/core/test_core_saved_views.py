"""Adapter tensors that are views into a larger block (a method keeping several adapters' weights in
one storage) are saved and returned as copies holding only their own values: ``save_pretrained``
(safetensors and pickle) and ``get_peft_model_state_dict`` never write or alias the whole block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from core_toy import ToyConfig, make_stack

from peft_kernel import PeftModel, get_peft_model, get_peft_model_state_dict
from peft_kernel.checkpoint import own_storage


def _model_with_views() -> tuple[torch.nn.Module, torch.Tensor]:
    """A toy model whose ``toy_a`` / ``toy_b`` tensors all live in one block (``toy_b`` as strided views)."""
    model = get_peft_model(make_stack(), ToyConfig(target_modules=["q", "v"], init_weights=False))
    params = [p for n, p in model.named_parameters() if ".toy_" in n]
    block = torch.zeros(len(params), 2 * max(p.numel() for p in params))
    with torch.no_grad():
        for i, p in enumerate(params):
            view = block[i, : 2 * p.numel() : 2]  # every other element: not contiguous
            view.copy_(p)
            p.data = view
    return model, block


def _owns(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_own_storage_copies_views_only() -> None:
    whole = torch.arange(6.0)
    assert own_storage(whole) is whole
    for view in (whole[2:4], whole[::2], whole.view(2, 3).t()):
        copy = own_storage(view)
        assert _owns(copy) and torch.equal(copy, view) and copy.data_ptr() != view.data_ptr()


def test_state_dict_of_views_holds_own_copies() -> None:
    model, block = _model_with_views()
    state = get_peft_model_state_dict(model)
    assert state and all(_owns(t) for t in state.values())
    storages = {t.untyped_storage().data_ptr() for t in state.values()}
    assert len(storages) == len(state) and block.untyped_storage().data_ptr() not in storages
    live = dict(model.named_parameters())
    for key, value in state.items():
        torch.testing.assert_close(value, live[key.replace(".toy_a", ".toy_a.default").replace(".toy_b", ".toy_b.default")])


@pytest.mark.parametrize("safe", [True, False])
def test_save_pretrained_writes_only_the_views(tmp_path: Path, safe: bool) -> None:
    model, block = _model_with_views()
    model.save_pretrained(tmp_path, safe_serialization=safe)
    name = "adapter_model.safetensors" if safe else "adapter_model.bin"
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".toy_" in n)
    assert (tmp_path / name).stat().st_size < adapter_bytes + 16_384  # not the whole block
    loaded = PeftModel.from_pretrained(make_stack(), tmp_path, allow_pickle=not safe)
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
