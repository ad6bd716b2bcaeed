"""Mixed batches through the shared projections (peft_kernel_lowrank.shared_mixed): ``vera_A`` /
``vera_B`` once for every row, each row's ``lambda_d`` / ``lambda_b`` gathered; adapters with other
projections in a pass of their own; fresh after writes, deletes and adds; gradients equal HF's."""

import pytest
import torch
from peft_kernel_testing import check_mixed_batch_against_hf, make_inputs, make_model
from peft_kernel_testing.freshness import check_cached_adapters_stay_fresh
from peft_kernel_testing.mixed_checks import check_mixed_gradients_against_hf, check_rows, only_path

from peft_kernel import get_peft_model
from peft_kernel_lowrank import mixed, shared_mixed
from peft_kernel_vera import VeraConfig
from peft_kernel_vera.layers import VeraLinear

TARGETS = ["q_proj", "k_proj", "down_proj"]


def vera(**kwargs):
    return VeraConfig(**{"r": 4, "target_modules": TARGETS, "init_weights": False, **kwargs})


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, VeraLinear)}


def perturb(model, adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model).values():
            for container in (layer.vera_lambda_b, layer.vera_lambda_d):
                if adapter in container:
                    container[adapter].add_(torch.randn(container[adapter].shape, generator=g))


def run(model, **kwargs):
    with torch.no_grad():
        return model(**make_inputs("llama"), **kwargs).logits


@pytest.fixture
def only_shared(monkeypatch):
    return only_path(monkeypatch, VeraLinear, "shared_mixed_add")


def check(model, names, atol=1e-5):
    check_rows(model, make_inputs("llama"), names, atol)


def three_adapters():
    model = get_peft_model(make_model("llama"), vera(), adapter_name="a")
    model.add_adapter("b", vera())
    model.add_adapter("c", vera(target_modules=["q_proj"]))  # drawn for 16 -> 16 layers: other projections
    for seed, name in enumerate("abc"):
        perturb(model, name, seed)
    return model.eval()


def test_rows_equal_single_runs_one_pass_per_projection_class(only_shared):
    model = three_adapters()
    names = ["b", "__base__", "a", "c"]
    for _ in range(2):  # the second forward reuses the cached classes and stacks
        check(model, names)
    q = next(layer for n, layer in layers(model).items() if n.endswith("q_proj"))
    with torch.no_grad():  # with autograd on and a trainable adapter the stacks are built afresh
        plan = shared_mixed.state_of(q).plan(q)
    assert plan["a"] is plan["b"] and plan["c"] is not plan["a"]  # c's projections differ: its own class
    assert plan["a"].stacks[0].shape == (3, 4 + 16)  # a, b and the zeros slot; lambda_d then lambda_b
    calls = len(only_shared)
    run(model, adapter_names=names)
    assert len(only_shared) - calls == 4 * 2  # per decoder layer, q_proj: two classes; k_proj, down_proj: one
    with torch.no_grad():
        assert plan is shared_mixed.state_of(q).plan(q)  # unchanged adapters: the same cached stacks


def test_delete_then_add_adapter(only_shared):
    model = three_adapters()
    model.delete_adapter("b")
    check(model, ["a", "__base__", "c", "a"])
    model.add_adapter("d", vera())
    perturb(model, "d", 5)
    check(model, ["d", "a", "c", "__base__"])
    assert only_shared


def test_in_place_writes_refresh_the_stacks_against_hf():
    check_cached_adapters_stay_fresh("llama", vera)


@pytest.mark.parametrize("save_projection", [True, False])
def test_hf_adapters_in_one_mixed_batch(only_shared, save_projection):
    peft = pytest.importorskip("peft")
    check_mixed_batch_against_hf("llama", lambda: peft.VeraConfig(r=4, target_modules=TARGETS,
                                                                  save_projection=save_projection, init_weights=False))
    assert only_shared


def test_gradients_through_a_mixed_batch_equal_hfs(only_shared):
    peft = pytest.importorskip("peft")
    check_mixed_gradients_against_hf("llama", lambda: peft.VeraConfig(r=4, target_modules=TARGETS, init_weights=False))
    assert only_shared


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_the_other_paths(monkeypatch, dtype):
    monkeypatch.setattr(VeraLinear, "shared_mixed_add", lambda *a: pytest.fail("the shared path ran in half precision"))
    model = get_peft_model(make_model("llama").to(dtype), vera(), adapter_name="a")
    model.add_adapter("b", vera())
    for seed, name in enumerate("ab"):
        perturb(model, name, seed)
    model.eval()
    # the stacked / grouped paths round differently from a single run (as before the shared path)
    check(model, ["b", "__base__", "a", "b"], atol=4e-3 if dtype == torch.bfloat16 else 5e-4)


def test_live_dropout_takes_the_other_paths(monkeypatch):
    model = get_peft_model(make_model("llama"), vera(vera_dropout=0.5), adapter_name="a")
    model.add_adapter("b", vera(vera_dropout=0.5))
    model.eval()
    for layer in layers(model).values():
        layer.train()  # a layer left in training in a model in eval mode
    assert not layer.shared_ready("a")
    monkeypatch.setattr(VeraLinear, "shared_mixed_add", lambda *a: pytest.fail("the shared path ran with dropout"))
    model(**make_inputs("llama"), adapter_names=["a", "b", "a", "b"])


def test_long_batches_take_the_stacked_kernels(monkeypatch):
    """Prefill-sized batches (more tokens than VeraLinear.shared_max_tokens) use the rank-padded stacks."""
    monkeypatch.setattr(VeraLinear, "shared_max_tokens", 8)  # the tiny inputs have 4 rows of 6 tokens
    monkeypatch.setattr(VeraLinear, "shared_mixed_add", lambda *a: pytest.fail("the shared path ran"))
    calls = []
    stacked = mixed.mixed_forward
    monkeypatch.setattr(mixed, "mixed_forward", lambda *a, **k: calls.append(1) or stacked(*a, **k))
    check(three_adapters(), ["b", "__base__", "a", "c"])
    assert calls
