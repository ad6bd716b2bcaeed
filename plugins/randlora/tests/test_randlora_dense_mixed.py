"""RandLora's factors hold more numbers than delta W (its rank reaches the smaller side), so mixed
batches longer than ``RandLoraLinear.shared_max_tokens`` (prefill; shorter ones share the bases:
test_randlora_shared_mixed.py) outside training use each adapter's dense delta W, cached while the
adapter is unchanged."""

import pytest

from peft_kernel import RandLoraConfig, get_peft_model
from peft_kernel_testing import make_inputs, make_model, perturb, run
from peft_kernel_testing.freshness import check_cached_adapters_stay_fresh
from peft_kernel_lowrank import mixed
from peft_kernel_randlora.layers import RandLoraLinear

pytest.importorskip("peft")


def config():
    return RandLoraConfig(r=4, randlora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)


@pytest.fixture
def prefill(monkeypatch):
    monkeypatch.setattr(RandLoraLinear, "shared_max_tokens", 0)  # every batch counts as long


@pytest.mark.parametrize("long", [False, True])
def test_mixed_and_single_runs_equal_hf_after_in_place_writes(monkeypatch, long):
    if long:
        monkeypatch.setattr(RandLoraLinear, "shared_max_tokens", 0)
    check_cached_adapters_stay_fresh("llama", config)


def test_mixed_batches_take_the_dense_path_not_the_stacks(monkeypatch, prefill):
    model = get_peft_model(make_model("llama"), config(), adapter_name="a")
    model.add_adapter("b", config())
    perturb(model, 0)
    model.eval()
    monkeypatch.setattr(mixed, "mixed_forward", lambda *a, **k: pytest.fail("the stacked kernels ran"))
    for _ in range(2):
        run(model, make_inputs("llama"), adapter_names=["a", "b", "__base__", "a"])
    layers = [m for m in model.modules() if isinstance(m, RandLoraLinear)]
    assert layers and all(len(layer.__dict__["_dense_deltas"]) == 2 for layer in layers)
    model.delete_adapter("b")
    run(model, make_inputs("llama"), adapter_names=["a", "__base__", "a", "a"])
    assert all(len(layer.__dict__["_dense_deltas"]) == 1 for layer in layers)
