"""``init_lora_weights="orthogonal"``: the properties of HF PEFT's initialisation (HF's random stream
is not reproduced, so weights are compared by property and statistics, not bit for bit), cross-loading
with HF, and the refused cases."""

import warnings

import pytest
import torch
from torch import nn

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_lora import LoraConfig

peft = pytest.importorskip("peft")


def orthogonal(**kwargs):
    return lambda: LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": "orthogonal", **kwargs})


CASES = [
    ConformanceCase("mlp", orthogonal(target_modules=["lin0", "lin1", "lin2"]), id="mlp-orthogonal"),
    ConformanceCase("gpt2-conv1d", orthogonal(target_modules=["c_fc", "c_proj"]), id="gpt2-conv1d-orthogonal"),
    ConformanceCase("llama", orthogonal(target_modules=["q_proj", "v_proj"], use_dora=True), id="llama-orthogonal-dora"),
]

TestOrthogonalConformance = conformance_suite(CASES)


class Net(nn.Module):
    def __init__(self, d_in: int = 256, d_out: int = 128) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.emb, self.conv = nn.Embedding(20, 8), nn.Conv1d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _factors(lib, seed=0, r=16, **kwargs):
    torch.manual_seed(seed)
    model = lib.get_peft_model(Net(), lib.LoraConfig(target_modules=["lin"], r=r, init_lora_weights="orthogonal", **kwargs))
    layer = model.base_model.model.lin
    return layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double(), model


def _properties(a, b, r):
    """B·A, the ranks, the angle between A's column space and B's row space, and the std of the
    Gaussian parts (A and B expressed in bases of those spaces)."""
    half = r // 2
    col_a = torch.linalg.svd(a)[0][:, :half]
    row_b = torch.linalg.svd(b)[2][:half].T
    return {
        "BA": (b @ a).abs().max().item(),
        "rank_A": torch.linalg.matrix_rank(a.float(), atol=1e-5).item(),
        "rank_B": torch.linalg.matrix_rank(b.float(), atol=1e-5).item(),
        "overlap": (col_a.T @ row_b).abs().max().item(),
        "std_A": (col_a.T @ a).std().item(),
        "std_B": (b @ row_b).std().item(),
    }


def test_properties_equal_hf():
    import peft_kernel

    ours = _properties(*_factors(peft_kernel)[:2], 16)
    theirs = _properties(*_factors(peft)[:2], 16)
    for props in (ours, theirs):
        assert props["BA"] < 1e-6 and props["overlap"] < 1e-6
        assert props["rank_A"] == props["rank_B"] == 8
    for key in ("std_A", "std_B"):
        assert abs(ours[key] - theirs[key]) < 0.01, (key, ours, theirs)
        assert abs(ours[key] - 0.1) < 0.01


def test_starts_as_identity_and_leaves_base_untouched():
    import peft_kernel

    torch.manual_seed(0)
    base = Net()
    weight = base.lin.weight.detach().clone()
    model = peft_kernel.get_peft_model(base, LoraConfig(target_modules=["lin"], r=8, init_lora_weights="orthogonal"))
    assert torch.equal(model.base_model.model.lin.base_layer.weight, weight)
    x = torch.randn(3, 256)
    with model.disable_adapter():
        expected = model(x)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)


def test_same_seed_same_weights():
    import peft_kernel

    a1, b1, _ = _factors(peft_kernel, seed=3)
    a2, b2, _ = _factors(peft_kernel, seed=3)
    a3, _, _ = _factors(peft_kernel, seed=4)
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and not torch.equal(a1, a3)


def test_odd_rank_refused_as_hf():
    import peft_kernel

    for lib in (peft, peft_kernel):
        with pytest.raises(ValueError, match="Orthogonal initialization requires the LoRA rank to be even, got 3 instead"):
            lib.get_peft_model(Net(), lib.LoraConfig(target_modules=["lin"], r=3, init_lora_weights="orthogonal"))
    with pytest.raises(ValueError, match="got 3 instead"):  # per module through rank_pattern too
        peft_kernel.get_peft_model(Net(), LoraConfig(target_modules=["lin"], r=4, rank_pattern={"lin": 3},
                                                     init_lora_weights="orthogonal"))


def test_conv_refused_embedding_falls_back_with_warning():
    import peft_kernel

    with pytest.raises(ValueError, match="only supported for linear layers, not Conv1d"):
        peft_kernel.get_peft_model(Net(), LoraConfig(target_modules=["conv"], r=2, init_lora_weights="orthogonal"))
    with pytest.warns(UserWarning, match="gets the default initialisation"):
        model = peft_kernel.get_peft_model(Net(), LoraConfig(target_modules=["emb"], r=2, init_lora_weights="orthogonal"))
    assert not model.base_model.model.emb.lora_embedding_A["default"].any()  # as HF: A zero, B normal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(Net(), peft.LoraConfig(target_modules=["emb"], r=2, init_lora_weights="orthogonal"))
    assert not hf.base_model.model.emb.lora_embedding_A["default"].any()
