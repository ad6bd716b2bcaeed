"""MiSS mixed batches through the shared path (shard sums once, one block product per adapter
group, cached Bat deltas): rows equal HF PEFT's single-adapter runs and our own, also after
in-place writes, delete / add, in half precision and under autograd (which takes the core's path)."""

import pytest
import torch

from peft_kernel import get_peft_model
from peft_kernel.plugin_api import AdapterLayer
from peft_kernel_testing import make_inputs, make_model, perturb, run
from peft_kernel_testing.freshness import check_cached_adapters_stay_fresh
from peft_kernel_miss import MissConfig
from peft_kernel_miss.layers import MissLinear

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
MODES = {"balance": dict(init_weights=True), "mini": dict(init_weights="mini", mini_r=4), "bat": dict(init_weights="bat")}


def _model(modes, kind="llama", r=4):
    """Ours with one adapter per entry of ``modes`` (``{name: mode}``), each perturbed."""
    model = None
    for seed, (name, mode) in enumerate(modes.items()):
        config = MissConfig(r=r, target_modules=TARGETS, **MODES[mode])
        if model is None:
            model = get_peft_model(make_model(kind), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        model.set_adapter(name)
        perturb(model, seed)
    return model.eval()


def _singles(model, inputs, names):
    out = {}
    for name in set(names) - {"__base__"}:
        model.set_adapter(name)
        out[name] = run(model, inputs)
    with model.disable_adapter():
        out["__base__"] = run(model, inputs)
    return out


def _refuse_delta(monkeypatch):
    def refuse(self, x, name):
        raise AssertionError("a per-group delta ran: the mixed batch took the core's loop")

    monkeypatch.setattr(MissLinear, "delta", refuse)


@pytest.mark.parametrize("names", [("b", "__base__", "a", "b"), ("a", "a", "b", "b")])
@pytest.mark.parametrize("mode", list(MODES))
def test_rows_equal_hf_after_in_place_writes(mode, names):
    """Each variant's mixed rows and single runs equal HF PEFT's, as built and after in-place writes
    to each adapter (the shared path's per-forward plan and the cached Bat deltas stay fresh)."""
    check_cached_adapters_stay_fresh("llama", lambda: MissConfig(r=4, target_modules=TARGETS, **MODES[mode]),
                                     names=names)


def test_modes_mix_in_one_batch_without_the_per_group_loop(monkeypatch):
    model = _model({"bal": "balance", "mini": "mini", "bat": "bat"})
    inputs = make_inputs("llama")
    names = ["bat", "mini", "__base__", "bal"]
    singles = _singles(model, inputs, names)
    _refuse_delta(monkeypatch)
    mixed = run(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-5, rtol=0)


def test_bat_delta_follows_the_base_weight():
    """Bat's cached update depends on the weight it applies to: an in-place write to the base weight
    (a merge elsewhere, a user edit) gives a new update, single and mixed."""
    model = _model({"a": "bat", "b": "balance"})
    inputs = make_inputs("llama")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    model.set_adapter("a")
    run(model, inputs)  # caches a's delta W
    with torch.no_grad():
        layer.base_layer.weight.mul_(1.5)
    expected = _singles(model, inputs, ["a"])["a"]
    uncached = layer.base_layer.weight + layer._bat_delta(layer.base_layer.weight, "a")
    torch.testing.assert_close(layer.cached_delta_weight("a") + layer.base_layer.weight, uncached, atol=0, rtol=0)
    torch.testing.assert_close(run(model, inputs, adapter_names=["a", "b", "a", "b"])[[0, 2]], expected[[0, 2]],
                               atol=1e-5, rtol=0)


def test_delete_and_add_back_under_the_same_name():
    model = _model({"a": "balance", "b": "bat"})
    inputs = make_inputs("llama")
    names = ["b", "a", "a", "b"]
    run(model, inputs, adapter_names=names)  # plans and caches exist
    model.delete_adapter("b")
    model.add_adapter("b", MissConfig(r=4, target_modules=TARGETS, init_weights="mini", mini_r=4))
    model.set_adapter("b")
    perturb(model, 7)
    model.eval()
    singles = _singles(model, inputs, names)
    mixed = run(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-5, rtol=0)


@pytest.mark.parametrize("names", [["b", "a", "__base__", "b"], ["a", "b", "b", "a"]])
@pytest.mark.parametrize("mode", ["balance", "mini"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rounds_as_the_per_group_path(dtype, mode, names, monkeypatch):
    """On a half-precision model the shared path rounds as the core's per-group path does (each
    group's update in the block dtype, added to the base output): bit for bit the same rows, within
    a few half-precision steps of HF's single runs (whose products run on the whole batch). One
    variant per model: HF PEFT 0.21.2 keeps the variant per layer, and a layer holding a balance and
    a mini adapter fails there with a size mismatch."""
    inputs = make_inputs("llama")
    hf = peft.get_peft_model(make_model("llama").to(dtype), peft.MissConfig(r=4, target_modules=TARGETS, **MODES[mode]),
                             adapter_name="a")
    hf.add_adapter("b", peft.MissConfig(r=4, target_modules=TARGETS, **MODES[mode]))
    for seed, name in enumerate("ab"):
        hf.set_adapter(name)
        perturb(hf, seed)
    hf.eval()
    ours = get_peft_model(make_model("llama").to(dtype), MissConfig(r=4, target_modules=TARGETS, **MODES[mode]),
                          adapter_name="a")
    ours.add_adapter("b", MissConfig(r=4, target_modules=TARGETS, **MODES[mode]))
    ours.load_state_dict(hf.state_dict(), strict=False)
    ours.eval()
    expected = _singles(hf, inputs, names)
    for name in ("a", "b"):
        ours.set_adapter(name)
        assert torch.equal(run(ours, inputs), expected[name])
    mixed = run(ours, inputs, adapter_names=names)
    assert mixed.dtype == dtype
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[name][row], atol=8e-3 if dtype == torch.bfloat16 else 1e-3,
                                   rtol=0)
    monkeypatch.setattr(MissLinear, "mixed_forward", AdapterLayer.mixed_forward)
    assert torch.equal(run(ours, inputs, adapter_names=names), mixed)


def test_gradients_through_a_mixed_batch_equal_per_group_runs():
    """Eval mode with autograd on (mixed batches are refused in training): the core's per-group path
    runs, and each block's gradient equals the one from single-adapter runs on that adapter's rows."""
    model = _model({"a": "balance", "b": "bat"})
    for name, p in model.named_parameters():
        p.requires_grad_("miss_block" in name)
    inputs = make_inputs("llama")
    names = ["b", "a", "a", "b"]
    model(**inputs, adapter_names=names).logits.square().mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for name in ("a", "b"):
        rows = [i for i, n in enumerate(names) if n == name]
        model.set_adapter(name)
        for n, p in model.named_parameters():
            p.requires_grad_("miss_block" in n)
        logits = model(input_ids=inputs["input_ids"][rows]).logits
        (logits.square().sum() / (len(names) * logits[0].numel())).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and got
    for key in got:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
