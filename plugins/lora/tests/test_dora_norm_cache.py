"""DoRA's weight norm is computed once per adapter and reused across forwards while the adapter,
its scaling and the base weight are unchanged; mixed batches and single runs stay equal to HF peft
after in-place writes."""

import pytest
import torch

from peft_kernel import LoraConfig, get_peft_model, rescale_adapter_scale
from peft_kernel_testing import make_inputs, make_model, perturb, run
from peft_kernel_testing.freshness import check_cached_adapters_stay_fresh
from peft_kernel_lora import dora

pytest.importorskip("peft")


def dora_config(**kwargs):
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                      init_lora_weights=False, **kwargs)


def test_mixed_and_single_runs_equal_hf_after_in_place_writes():
    check_cached_adapters_stay_fresh("llama", dora_config)


def test_norm_is_computed_once_and_again_after_a_base_write_or_a_scaling_change(monkeypatch):
    model = get_peft_model(make_model("llama"), dora_config())
    perturb(model, 0)
    model.eval()
    calls = []
    original = dora.weight_norm
    monkeypatch.setattr(dora, "weight_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    inputs = make_inputs("llama")
    first = run(model, inputs)
    layers = len(calls)
    assert layers == 6 and torch.equal(run(model, inputs), first) and len(calls) == layers
    with rescale_adapter_scale(model, 0.5):
        halved = run(model, inputs)
    assert len(calls) == 2 * layers and not torch.allclose(halved, first)
    assert torch.equal(run(model, inputs), first) and len(calls) == 3 * layers
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.base_layer.weight.mul_(1.1)  # an in-place write to the base (a merge, a load)
    written = run(model, inputs)
    assert len(calls) == 3 * layers + 1
    calls.clear()
    fresh = get_peft_model(make_model("llama"), dora_config())
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(run(fresh.eval(), inputs), written, rtol=0, atol=1e-6)


def test_deleting_an_adapter_drops_its_cached_norm():
    model = get_peft_model(make_model("llama"), dora_config(), adapter_name="a")
    model.add_adapter("b", dora_config())
    model.eval()
    inputs = make_inputs("llama")
    for name in ("a", "b"):
        model.set_adapter(name)
        run(model, inputs)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert len(q_proj.__dict__["_dora_norms"]._derived) == 2
    model.delete_adapter("b")
    assert len(q_proj.__dict__["_dora_norms"]._derived) == 1
