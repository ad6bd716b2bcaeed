"""LoKr on a Linear base without building ``delta W``: the Kronecker product applied factor by
factor equals HF PEFT's dense forward, mixed batches run all rows on stacked factors and equal
per-row single runs, and the stack follows in-place writes, rescaling and adapters of other shapes."""

import torch

from peft_kernel import get_peft_model
from peft_kernel_lokr import LoKrConfig
from peft_kernel_lokr.layers import LoKrLayer
from peft_kernel_lycoris import testing as lt
from peft_kernel_lycoris.kron import kron_apply, kron_apply_rows
from peft_kernel_testing import make_inputs, make_model, output_tensor


def _layers(model):
    return [m for m in model.modules() if isinstance(m, LoKrLayer)]


def test_kron_apply_equals_the_dense_product():
    gen = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(3, 4, generator=gen), torch.randn(5, 2, generator=gen)
    x = torch.randn(2, 7, 8, generator=gen)
    dense = x @ torch.kron(w1, w2).t()
    assert torch.allclose(kron_apply(x, w1, w2), dense, atol=1e-5)
    w1s, w2s = torch.stack([w1, 2 * w1]), torch.stack([w2, w2.flip(0)])
    rows = kron_apply_rows(x, w1s, w2s, torch.tensor([1, 0]))
    assert torch.allclose(rows[0], x[0] @ torch.kron(2 * w1, w2.flip(0)).t(), atol=1e-5)
    assert torch.allclose(rows[1], dense[1], atol=1e-5)


def test_linear_forward_equals_hf_dense_forward():
    for kind, targets in (("mlp", ["lin0", "lin1"]), ("llama", ["q_proj", "down_proj"])):
        hf, ours = lt.hf_and_ours(lt.hf_peft().LoKrConfig(r=2, alpha=3, decompose_both=True, target_modules=targets), kind)
        inputs = make_inputs(kind)
        with torch.no_grad():
            assert (output_tensor(ours.eval()(**inputs)) - output_tensor(hf.eval()(**inputs))).abs().max() <= 1e-5, kind


def _two_adapters(**other):
    model = get_peft_model(make_model("mlp"), LoKrConfig(r=2, target_modules=["lin0"], init_weights=False), adapter_name="a")
    model.add_adapter("b", LoKrConfig(r=2, target_modules=["lin0"], init_weights=False, **other))
    return model.eval()


def _check_rows(model, names):
    return lt.check_mixed_rows(model, make_inputs("mlp"), names)


def test_mixed_batch_runs_on_the_stack_and_follows_changes():
    model = _two_adapters()
    names = ["a", "b", "__base__", "b"]
    before = _check_rows(model, names)
    (layer,) = _layers(model)
    assert layer._kron_stack._cache._entries["stack"][2][0][0] == ("a", "b")
    with torch.no_grad():
        next(iter(layer.adapter_parameters("b"))).mul_(3.0)  # an optimizer step / load_adapter
    after = _check_rows(model, names)
    assert not torch.allclose(before[1], after[1]) and torch.allclose(before[0], after[0])
    layer.scaling["a"] = 0.5  # what rescale_adapter_scale / hotswap_adapter change
    rescaled = _check_rows(model, names)
    assert not torch.allclose(after[0], rescaled[0])


def test_adapters_of_different_factor_shapes_take_the_grouped_path():
    model = _two_adapters(decompose_factor=2)
    _check_rows(model, ["b", "a", "a", "__base__"])
    (layer,) = _layers(model)
    assert layer._kron_stack._cache._entries["stack"][2][1] is None
