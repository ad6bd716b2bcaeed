"""LoHa on a Linear base as its exact rank-``r**2`` factors (the low-rank family's kernels): the
factors reproduce the dense delta, outputs equal HF PEFT's dense forward, mixed batches run stacked
and equal per-row single runs, in-place writes are seen, and the cost rule picks the cheaper form."""

import pytest
import torch

import peft_kernel_loha.layers as loha_layers
from peft_kernel import get_peft_model
from peft_kernel_loha import LoHaConfig
from peft_kernel_loha.layers import LoHaLayer, face_split, factored_is_cheaper
from peft_kernel_lycoris import testing as lt
from peft_kernel_testing import make_inputs, make_model, output_tensor


@pytest.fixture
def always_factored(monkeypatch):
    monkeypatch.setattr(loha_layers, "FACTORED", "always")


def _layers(model):
    return [m for m in model.modules() if isinstance(m, LoHaLayer)]


def test_face_split_reproduces_the_hadamard_product():
    gen = torch.Generator().manual_seed(0)
    w1_a, w2_a = torch.randn(7, 3, generator=gen), torch.randn(7, 3, generator=gen)
    w1_b, w2_b = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    v, u = face_split(w1_a, w1_b, w2_a, w2_b)
    assert v.shape == (9, 5) and u.shape == (7, 9)
    assert torch.allclose(u @ v, (w1_a @ w1_b) * (w2_a @ w2_b), atol=1e-5)


def test_cost_rule():
    assert factored_is_cheaper(8, 512, 512)  # 64 * 1024 < 512 * 512
    assert not factored_is_cheaper(8, 16, 16)
    assert not factored_is_cheaper(32, 512, 1376)  # 1024 * 1888 > 704512


def test_factors_only_where_the_math_is_a_plain_product(always_factored):
    model = get_peft_model(make_model("conv2d"), LoHaConfig(r=2, target_modules=["conv0", "lin"], rank_dropout=0.5))
    conv, lin = _layers(model)
    model.eval()
    assert conv.low_rank_factors("default") is None  # a convolution is not a matmul on features
    v, u, scale = lin.low_rank_factors("default")
    assert torch.allclose(u @ v * scale, lin.delta_weight("default"), atol=1e-6)
    model.train()
    assert lin.low_rank_factors("default") is None  # live rank dropout: the dense path draws HF's mask
    assert lin.low_rank_factors("missing") is None


def test_cheaper_rule_decides_by_default():
    model = get_peft_model(make_model("mlp"), LoHaConfig(r=8, target_modules=["lin0"]))
    (layer,) = _layers(model)
    model.eval()
    assert layer.low_rank_factors("default") is None  # 64 * (in + out) is more than in * out here
    model = get_peft_model(make_model("mlp"), LoHaConfig(r=1, target_modules=["lin0"]))
    (layer,) = _layers(model.eval())
    assert layer.low_rank_factors("default") is not None


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_factored_outputs_equal_hf_dense_forward(always_factored, kind):
    targets = ["lin0", "lin1"] if kind == "mlp" else ["q_proj", "v_proj", "down_proj"]
    hf, ours = lt.hf_and_ours(lt.hf_peft().LoHaConfig(r=3, alpha=5, target_modules=targets), kind)
    hf.eval()
    ours.eval()
    assert all(layer.low_rank_factors("default") is not None for layer in _layers(ours))
    inputs = make_inputs(kind)
    with torch.no_grad():
        assert (output_tensor(ours(**inputs)) - output_tensor(hf(**inputs))).abs().max() <= 1e-5


def test_factored_mixed_batch_runs_stacked_and_equals_single_runs(always_factored):
    lt.check_mixed_batch_three_adapters(lambda: LoHaConfig(r=2, target_modules=["lin0", "lin1"]), "mlp")
    model = get_peft_model(make_model("mlp"), LoHaConfig(r=2, target_modules=["lin0"], init_weights=False), adapter_name="a")
    model.add_adapter("b", LoHaConfig(r=3, target_modules=["lin0"], init_weights=False))
    model.eval()
    with torch.no_grad():
        model(**make_inputs("mlp"), adapter_names=["a", "b", "a", "__base__"])
    (layer,) = _layers(model)
    assert layer.__dict__["_low_rank_stack"].names == ("a", "b")


def test_in_place_writes_and_deletes_are_seen(always_factored):
    model = get_peft_model(make_model("mlp"), LoHaConfig(r=2, target_modules=["lin0"], init_weights=False))
    model.add_adapter("other", LoHaConfig(r=2, target_modules=["lin0"], init_weights=False))
    model.eval()
    (layer,) = _layers(model)
    inputs = make_inputs("mlp")
    names = ["default", "other", "default", "other"]
    with torch.no_grad():
        before = output_tensor(model(**inputs, adapter_names=names))
        layer.hada_w2_b["default"].mul_(2.0)  # what an optimizer step or load_adapter does
        after = output_tensor(model(**inputs, adapter_names=names))
        v, u, scale = layer.low_rank_factors("default")
        assert torch.allclose(u @ v * scale, layer.delta_weight("default"), atol=1e-6)
        model.set_adapter("default")
        single = output_tensor(model(**inputs))
    assert not torch.allclose(before[0::2], after[0::2])
    assert (after[0::2] - single[0::2]).abs().max() <= 1e-5
    model.delete_adapter("other")
    assert len(layer._factored) == 1


def test_factored_half_precision_base_matches_hf(always_factored):
    peft = lt.hf_peft()
    hf_model = peft.get_peft_model(make_model("mlp").to(torch.bfloat16), peft.LoHaConfig(r=2, target_modules=["lin0", "lin1"]))
    lt.perturb(hf_model)
    ours = get_peft_model(make_model("mlp").to(torch.bfloat16), LoHaConfig(r=2, target_modules=["lin0", "lin1"]))
    ours.load_state_dict(hf_model.state_dict())
    inputs = {k: v.to(torch.bfloat16) for k, v in make_inputs("mlp").items()}
    with torch.no_grad():
        ours_out, hf_out = output_tensor(ours.eval()(**inputs)), output_tensor(hf_model.eval()(**inputs))
    assert ours_out.dtype == torch.bfloat16
    assert (ours_out.float() - hf_out.float()).abs().max() <= 2e-2  # one bf16 rounding of the sum
