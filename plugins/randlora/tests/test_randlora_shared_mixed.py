"""Mixed batches of decode size through the shared bases (peft_kernel_lowrank.shared_mixed): the
bases once for every row, each row's ``lambda`` / ``gamma`` applied per adapter group, on both
orientations (the layer's smaller side as input or as output); fresh after writes, rescaling,
deletes and adds; gradients equal HF's; float64 against the folded and dense updates."""

import pytest
import torch
from peft_kernel_testing import check_mixed_batch_against_hf, make_inputs, make_model
from peft_kernel_testing.mixed_checks import check_mixed_gradients_against_hf, check_rows, only_path

from peft_kernel import get_peft_model
from peft_kernel_lowrank import shared_mixed
from peft_kernel_randlora import RandLoraConfig
from peft_kernel_randlora.layers import RandLoraLinear

TARGETS = ["k_proj", "up_proj", "down_proj"]  # tiny llama: 16->8, 16->32, 32->16 (both orientations)


def randlora(**kwargs):
    return RandLoraConfig(**{"r": 3, "randlora_alpha": 2, "target_modules": TARGETS, **kwargs})


def layers(model):
    return [m for m in model.modules() if isinstance(m, RandLoraLinear)]


def perturb(model, adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model):
            for container in (layer.randlora_lambda, layer.randlora_gamma):
                if adapter in container:
                    container[adapter].add_(torch.randn(container[adapter].shape, generator=g).to(container[adapter]) * 0.3)


def three_adapters(dtype=torch.float32, **kwargs):
    model = get_peft_model(make_model("llama").to(dtype), randlora(**kwargs), adapter_name="a")
    model.add_adapter("b", randlora(**kwargs))
    model.add_adapter("c", randlora(**{**kwargs, "target_modules": ["k_proj"]}))  # other bases: its own class
    for seed, name in enumerate("abc"):
        perturb(model, name, seed)
    return model.eval()


@pytest.fixture
def only_shared(monkeypatch):
    return only_path(monkeypatch, RandLoraLinear, "shared_mixed_add")


def test_rows_equal_single_runs_one_pass_per_basis_class(only_shared):
    model = three_adapters()
    names = ["b", "__base__", "a", "c"]
    for _ in range(2):  # the second forward reuses the cached classes and stacks
        check_rows(model, make_inputs("llama"), names)
    k = next(layer for layer in layers(model) if "c" in layer.randlora_lambda)
    with torch.no_grad():
        plan = shared_mixed.state_of(k).plan(k)
    assert plan["a"] is plan["b"] and plan["c"] is not plan["a"]
    assert len(only_shared) == 2 * 2 * 4  # two forwards; per decoder layer, k_proj: two classes, up/down: one


def test_rescaling_deleting_and_adding_refresh_the_stacks(only_shared):
    model = three_adapters()
    for layer in layers(model):
        if "a" in layer.scaling:
            layer.scaling["a"] *= 3  # what rescale_adapter_scale does: no tensor changes
    check_rows(model, make_inputs("llama"), ["a", "b", "c", "__base__"])
    model.delete_adapter("b")
    check_rows(model, make_inputs("llama"), ["a", "__base__", "c", "a"])
    model.add_adapter("d", randlora())
    perturb(model, "d", 5)
    check_rows(model, make_inputs("llama"), ["d", "a", "c", "__base__"])
    assert only_shared


@pytest.mark.parametrize("kind", [{}, {"sparse": True}])
def test_hf_adapters_in_one_mixed_batch(only_shared, kind):
    peft = pytest.importorskip("peft")
    check_mixed_batch_against_hf("llama", lambda: peft.RandLoraConfig(r=3, target_modules=TARGETS, init_weights=False,
                                                                      **kind))
    assert only_shared


def test_gradients_through_a_mixed_batch_equal_hfs(only_shared):
    peft = pytest.importorskip("peft")
    check_mixed_gradients_against_hf("llama", lambda: peft.RandLoraConfig(r=3, target_modules=TARGETS, init_weights=False))
    assert only_shared


def test_float64_rank_near_the_layer_size(only_shared):
    """r = 12 on 16- and 32-wide layers: the folded rank ``r * n`` reaches the smaller side, where
    float32 results differ by more than 1e-5 at larger shapes (docs/performance.md); in float64
    the shared path equals the single-adapter (folded) runs and, layer by layer, each row times its
    adapter's merged dense weight (``delta_weight``, checked against the paper's sum elsewhere)."""
    from peft_kernel.routing import routed

    model = three_adapters(torch.float64, r=12)
    names = ["b", "__base__", "a", "c"]
    check_rows(model, make_inputs("llama"), names, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    for layer in layers(model):
        x = torch.randn(len(names), 2, layer.in_features, generator=g, dtype=torch.float64)
        with torch.no_grad(), routed(names) as routing:
            got = layer.mixed_forward(x, routing)
            for row, name in enumerate(names):
                weight = layer.base_layer.weight
                if layer.has_adapter(name):
                    weight = weight + layer.delta_weight(name)
                torch.testing.assert_close(got[row], x[row] @ weight.T, rtol=0, atol=1e-12)
    assert only_shared


def test_long_batches_take_the_dense_path(monkeypatch):
    """Prefill-sized batches (more tokens than RandLoraLinear.shared_max_tokens) use each adapter's cached dense delta W."""
    monkeypatch.setattr(RandLoraLinear, "shared_max_tokens", 8)  # the tiny inputs have 4 rows of 6 tokens
    monkeypatch.setattr(RandLoraLinear, "shared_mixed_add", lambda *a: pytest.fail("the shared path ran"))
    check_rows(three_adapters(), make_inputs("llama"), ["b", "__base__", "a", "c"])
