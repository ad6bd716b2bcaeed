"""C3A's vectorised mixed batches (``peft_kernel_c3a.spectral.apply_padded``): rows padded per adapter,
one FFT / ``bmm`` / inverse FFT for every adapter. Every row equals its single-adapter run and HF
peft's; unbalanced groups, base rows, prompts, decode steps and generate, new and deleted adapters, gradients,
half precision and float64."""

import pytest
import torch
from torch import nn

import peft_kernel as pk
from peft_kernel import C3AConfig, get_peft_model
from peft_kernel_c3a import spectral
from peft_kernel_testing import run
from peft_kernel_testing.hf_oracle import hf_oracle, max_abs_diff, perturb
from peft_kernel_testing.models import make_inputs, make_model

peft = pytest.importorskip("peft")

CONFIG = dict(target_modules=["q_proj", "v_proj", "down_proj"], block_size=4, init_weights=False)


def llama(adapters=("one", "two", "six"), dtype=torch.float32):
    model = get_peft_model(make_model("llama").to(dtype), C3AConfig(**CONFIG), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, C3AConfig(**CONFIG))
    for seed, name in enumerate(adapters):
        model.set_adapter(name)
        perturb(model, seed, scale=0.5)
    return model.eval()


def singles(model, inputs):
    """Our own single-adapter runs (and the base), per adapter name."""
    out = {}
    for name in model.peft_config:
        model.set_adapter(name)
        out[name] = run(model, inputs)
    with model.disable_adapter():
        out["__base__"] = run(model, inputs)
    return out


def hf_singles(model, inputs):
    """HF peft's single-adapter runs with our adapters' weights."""
    with hf_oracle("HF peft running C3A adapters one at a time"):
        hf = peft.get_peft_model(make_model("llama"), peft.C3AConfig(**CONFIG), adapter_name="one")
        for name in model.peft_config:
            if name != "one":
                hf.add_adapter(name, peft.C3AConfig(**CONFIG))
            peft.set_peft_model_state_dict(hf, pk.get_peft_model_state_dict(model, adapter_name=name), adapter_name=name)
        hf.eval()
        out = {}
        for name in model.peft_config:
            hf.set_adapter(name)
            out[name] = run(hf, inputs)
        with hf.disable_adapter():
            out["__base__"] = run(hf, inputs)
    return out


def check_rows(mixed, expected, names, tolerance=1e-5):
    for row, name in enumerate(names):
        diff = max_abs_diff(mixed[row], expected[name][row])
        assert diff <= tolerance, f"row {row} ({name}): {diff:.2e}"


def padded_calls(monkeypatch):
    calls = []
    original = spectral.apply_padded
    monkeypatch.setattr(spectral, "apply_padded", lambda *a: calls.append(a[3].width) or original(*a))
    return calls


@pytest.mark.parametrize("names, padded", [
    (["one", "two", "six", "one", "two", "six"], True),  # balanced: every row, one bmm over the three adapters
    (["two", "__base__", "one", "two", "two", "__base__"], True),  # base rows, unequal groups padded
    (["one", "one", "one", "one", "one", "two", "six", "one"], False),  # 3 groups of 6 rows would serve 8: per-group path
    (["six", "six", "six", "six"], True),  # one adapter for the whole batch
])
def test_rows_equal_single_adapter_runs_and_hf(monkeypatch, names, padded):
    model = llama()
    inputs = make_inputs("llama", batch=len(names))
    calls = padded_calls(monkeypatch)
    mixed = run(model, inputs, adapter_names=names)
    assert bool(calls) == padded
    check_rows(mixed, singles(model, inputs), names)
    check_rows(mixed, hf_singles(model, inputs), names)


def test_decode_steps_on_a_kv_cache_equal_single_adapter_steps():
    model = llama()
    names = ["two", "one", "__base__", "six"]
    ids = make_inputs("llama", batch=4)["input_ids"]
    step = torch.tensor([[3], [5], [7], [9]])
    with torch.no_grad():
        cache = model(input_ids=ids, adapter_names=names, use_cache=True).past_key_values
        mixed = model(input_ids=step, past_key_values=cache, adapter_names=names).logits
    expected = singles(model, {"input_ids": torch.cat([ids, step], 1)})
    for row, name in enumerate(names):
        assert max_abs_diff(mixed[row, -1], expected[name][row, -1]) <= 1e-5


def test_new_and_deleted_adapters_are_seen_by_the_stacked_spectra():
    model = llama()
    names = ["one", "two", "six", "two"]
    inputs = make_inputs("llama", batch=4)
    run(model, inputs, adapter_names=names)  # stacks a, b, c
    model.delete_adapter("two")
    model.add_adapter("two", C3AConfig(**CONFIG))  # same name, new kernels
    model.set_adapter("two")
    perturb(model, 7, scale=0.5)
    check_rows(run(model, inputs, adapter_names=names), hf_singles(model, inputs), names)
    model.delete_adapter("six")
    names = ["one", "two", "__base__", "two"]
    check_rows(run(model, inputs, adapter_names=names), singles(model, inputs), names)


def test_gradients_through_a_mixed_batch_equal_the_dense_formula():
    """Kernels trained through a mixed batch get the gradients of ``x @ (W + dW_row)^T`` with each
    row's dense block-circulant ``dW`` (an independent oracle)."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 8)), C3AConfig(target_modules=["0"], block_size=4,
                                                                      init_weights="gaussian"), adapter_name="one")
    model.add_adapter("two", C3AConfig(target_modules=["0"], block_size=4, init_weights="gaussian"))
    layer = model.base_model.model[0]
    for p in layer.c3a_kernel.values():
        p.requires_grad_(True)
    model.eval()
    x = torch.randn(6, 16)
    names = ["two", "one", "__base__", "two", "one", "one"]
    model(x, adapter_names=names).pow(2).sum().backward()
    index = (torch.arange(4)[None, :] - torch.arange(4)[:, None]) % 4
    for name, kernel in layer.c3a_kernel.items():
        kernel = kernel.detach().requires_grad_(True)
        dense = kernel[:, :, index].permute(0, 2, 1, 3).reshape(8, 16) / 16
        rows = [i for i, n in enumerate(names) if n == name]
        out = x[rows] @ (layer.base_layer.weight + dense).T + layer.base_layer.bias
        out.pow(2).sum().backward()
        torch.testing.assert_close(layer.c3a_kernel[name].grad, kernel.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3), (torch.float64, 1e-12)])
def test_other_dtypes_equal_single_adapter_runs(monkeypatch, dtype, tolerance):
    model = llama(dtype=dtype)
    names = ["two", "__base__", "one", "two", "six", "one"]
    inputs = make_inputs("llama", batch=len(names))
    calls = padded_calls(monkeypatch)
    mixed = run(model, inputs, adapter_names=names)
    assert calls and mixed.dtype == dtype
    check_rows(mixed, singles(model, inputs), names, tolerance)


def test_padding_layout():
    groups = [torch.tensor([1, 4]), torch.tensor([0]), torch.tensor([2, 3, 5])]
    pad = spectral.padding(groups, batch=7)
    assert pad.width == 3 and not pad.every_row
    assert pad.fill.tolist() == [1, 4, 4, 0, 0, 0, 2, 3, 5]
    assert pad.rows.tolist() == [0, 1, 2, 3, 4, 5] and pad.positions.tolist() == [3, 0, 6, 7, 1, 8]
    assert spectral.padding([torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5]), torch.tensor([6])], batch=7) is None


def test_generate_with_a_mixed_batch_matches_greedy_decoding():
    from peft_kernel_testing.generation import check_generate_matches_greedy

    ids = make_inputs("llama", batch=3)["input_ids"]
    check_generate_matches_greedy(llama(), ids, max_new_tokens=3, adapter_names=["two", "__base__", "six"])
