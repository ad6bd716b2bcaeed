"""The ``slots`` mixed-batch kernel's row layouts (already grouped, strided adapters, gathered,
unbalanced groups) against the plain loop path and HF PEFT (1e-5, fp32), also after optimizer
steps, ``hotswap_adapter``, ``delete_adapter`` and dtype moves. No timing here: see benchmarks/."""

from __future__ import annotations

import pytest
import torch

from peft_kernel_lowrank import mixed

peft = pytest.importorskip("peft")
from test_mixed_fast import ALL, build, ids, logits, single_rows  # noqa: E402

import peft_kernel as pk  # noqa: E402

ATOL = 1e-5
LAYOUTS = {
    "grouped": [f"n{i}" for i in range(8)],  # one row per adapter in stack order: no gathers at all
    "grouped-pairs": ["n0", "n0", "n1", "n1", "n2", "n2"],
    "strided": ["n0", "n2", "n4", "n6"],  # evenly spaced adapters: the stack is read through a view
    "gathered": ["n3", "n1", "n3", "n0", "n1", "n0"],
    "unbalanced": ["n5", "n1", "n5", "__base__", "n5", "n2", "n1"],
}


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    return build({f"n{i}": dict(r=4, lora_alpha=8, target_modules=ALL, lora_bias=i == 3) for i in range(8)})


def loop_rows(ours: torch.nn.Module, x: torch.Tensor, names: list[str], monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(mixed, "strategy", "loop")
        return logits(ours, x, adapter_names=names)


def check(hf, ours, names, monkeypatch, seq=5, seed=0):
    x = ids(len(names), seq, seed)
    monkeypatch.setattr(mixed, "strategy", "slots")
    got = logits(ours, x, adapter_names=names)
    torch.testing.assert_close(got, loop_rows(ours, x, names, monkeypatch), atol=ATOL, rtol=0)
    if hf is not None:
        torch.testing.assert_close(got, logits(hf, x, adapter_names=names), atol=ATOL, rtol=0)
    return got


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seq", [1, 5])
def test_slots_layouts_equal_loop_and_hf(models, layout, seq, monkeypatch):
    hf, ours = models
    check(hf, ours, LAYOUTS[layout], monkeypatch, seq=seq)


def test_auto_picks_slots_for_decode(models, monkeypatch):
    hf, ours = models
    used = []
    real = mixed._slots
    monkeypatch.setattr(mixed, "_KERNELS", {**mixed._KERNELS, "slots": lambda *a: used.append(1) or real(*a)})
    monkeypatch.setattr(mixed, "CONCAT_MAX_RANK", 0)
    x = ids(8, 1)
    got = logits(ours, x, adapter_names=LAYOUTS["grouped"])
    assert used
    torch.testing.assert_close(got, logits(hf, x, adapter_names=LAYOUTS["grouped"]), atol=ATOL, rtol=0)


def test_slots_follow_optimizer_steps_hotswap_and_delete(monkeypatch, tmp_path):
    hf, ours = build({f"n{i}": dict(r=4, lora_alpha=8, target_modules=ALL) for i in range(4)})
    names = ["n0", "n1", "n2", "n3"]
    check(hf, ours, names, monkeypatch)  # stacks built
    # optimizer steps on both (same gradients: the same loss on the same weights)
    for model in (hf, ours):
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=0.1)
        model(input_ids=ids(4, 5, 9), adapter_names=names).logits.square().mean().backward()
        opt.step()
        for p in params:
            p.requires_grad_(False)
    check(hf, ours, names, monkeypatch, seed=1)
    # hotswap n1 with n3's weights (saved by ours), in both
    ours.save_pretrained(tmp_path / "ours", selected_adapters=["n3"])
    pk.hotswap_adapter(ours, tmp_path / "ours" / "n3", adapter_name="n1")
    from peft.utils.hotswap import hotswap_adapter as hf_hotswap

    hf_hotswap(hf, str(tmp_path / "ours" / "n3"), adapter_name="n1")
    got = check(hf, ours, names, monkeypatch, seed=2)
    torch.testing.assert_close(got[1], single_rows(ours, ids(4, 5, 2), names)[1], atol=ATOL, rtol=0)
    ours.delete_adapter("n2")
    hf.delete_adapter("n2")
    check(hf, ours, ["n0", "n1", "n3", "__base__"], monkeypatch, seed=3)


def test_slots_after_dtype_moves(monkeypatch):
    _, ours = build({f"n{i}": dict(r=4, lora_alpha=8, target_modules=ALL) for i in range(3)})
    names = ["n0", "n1", "n2", "n0"]
    check(None, ours, names, monkeypatch)
    ours.to(torch.float64)
    got = check(None, ours, names, monkeypatch)
    assert got.dtype == torch.float64
    ours.to(torch.bfloat16)  # half precision: the loop path's roundings, not 1e-5
    monkeypatch.setattr(mixed, "strategy", "slots")
    x = ids(4, 3)
    got = logits(ours, x, adapter_names=names)
    torch.testing.assert_close(got, loop_rows(ours, x, names, monkeypatch), atol=0.1, rtol=0.05)


def test_base_layer_hooks_still_run_on_the_fast_paths(monkeypatch):
    """The fast paths call a plain ``nn.Linear`` base as ``F.linear``; a hooked one is called."""
    hf, ours = build({f"n{i}": dict(r=4, lora_alpha=8, target_modules=ALL) for i in range(2)})
    x = ids(2, 3)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    handle = layer.base_layer.register_forward_hook(lambda m, i, o: calls.append(1) or o * 2)
    try:
        hooked_single = logits(ours, x)
        hooked_mixed = logits(ours, x, adapter_names=["n0", "n1"])
    finally:
        handle.remove()
    assert len(calls) == 2
    hf_layer = hf.base_model.model.model.layers[0].self_attn.q_proj
    handle = hf_layer.base_layer.register_forward_hook(lambda m, i, o: o * 2)
    try:
        torch.testing.assert_close(hooked_single, logits(hf, x), atol=ATOL, rtol=0)
        torch.testing.assert_close(hooked_mixed, logits(hf, x, adapter_names=["n0", "n1"]), atol=ATOL, rtol=0)
    finally:
        handle.remove()
    torch.testing.assert_close(logits(ours, x), logits(hf, x), atol=ATOL, rtol=0)
