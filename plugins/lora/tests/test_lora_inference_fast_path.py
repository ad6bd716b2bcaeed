"""``peft_kernel_lowrank.single.inference_forward``: the no-grad forward of a low-rank layer with its
active adapters. It must give the general forward's output bit for bit (and HF's within 1e-5), be
the path taken where it applies, and step aside (return ``None``) in every state where the general
forward does something else."""

import copy

import peft
import pytest
import torch
from torch import nn

import peft_kernel as pk
from peft_kernel_lowrank import single


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 20)
        self.lin1 = nn.Linear(20, 12, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _models(**options):
    torch.manual_seed(0)
    base = _MLP()
    config = dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=False, **options)
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(**config))
    hf.add_adapter("other", peft.LoraConfig(**config))
    ours.add_adapter("other", pk.LoraConfig(**config))
    for name in ("default", "other"):
        pk.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(hf, adapter_name=name), adapter_name=name)
    return hf.eval(), ours.eval()


@pytest.fixture
def taken(monkeypatch):
    """Counts the calls that the fast path served (non-``None``)."""
    served = []
    real = single.inference_forward

    def spy(layer, x):
        out = real(layer, x)
        if out is not None:
            served.append(layer)
        return out

    monkeypatch.setattr(single, "inference_forward", spy)
    return served


def _general(model, x, **kwargs):
    """The output with the fast path switched off."""
    real = single.inference_forward
    single.inference_forward = lambda layer, x: None
    try:
        return model(x, **kwargs)
    finally:
        single.inference_forward = real


@pytest.mark.parametrize("options", [{}, {"lora_bias": True}, {"use_rslora": True}])
def test_equals_general_path_and_hf(taken, options):
    hf, ours = _models(**options)
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        out = ours(x)
        assert len(taken) == 2  # both layers served
        assert torch.equal(out, _general(ours, x))
        assert (out - hf(x)).abs().max() <= 1e-5


def test_several_active_adapters(taken):
    hf, ours = _models()
    hf.base_model.set_adapter(["default", "other"])
    ours.base_model.set_adapter(["default", "other"])
    x = torch.randn(4, 12)
    with torch.no_grad():
        out = ours(x)
        assert len(taken) == 2
        assert torch.equal(out, _general(ours, x))
        assert (out - hf(x)).abs().max() <= 1e-5


def test_follows_writes_replacements_and_scale_changes(taken):
    hf, ours = _models()
    x = torch.randn(4, 12)
    layer = ours.base_model.model.lin0
    with torch.no_grad():
        before = ours(x)
        layer.lora_B["default"].weight.mul_(2)  # in place
        after_write = ours(x)
        assert not torch.equal(before, after_write) and torch.equal(after_write, _general(ours, x))
        layer.lora_A["default"].weight = nn.Parameter(torch.randn(4, 12))  # a new tensor
        replaced = ours(x)
        assert not torch.equal(after_write, replaced) and torch.equal(replaced, _general(ours, x))
        with pk.rescale_adapter_scale(ours, 0.5):
            rescaled = ours(x)
            assert not torch.equal(replaced, rescaled) and torch.equal(rescaled, _general(ours, x))
    assert len(taken) == 8


def test_steps_aside_where_the_general_forward_differs(taken):
    hf, ours = _models(lora_dropout=0.5)
    x = torch.randn(4, 12)
    ours.train()
    with torch.no_grad():
        ours(x)  # live dropout in training: the general path applies it
    assert not taken
    ours.eval()
    out = ours(x)  # autograd on
    assert not taken and out.requires_grad
    with torch.no_grad():
        with ours.disable_adapter():
            assert torch.equal(ours(x), ours.get_base_model()(x))
        assert not taken
        ours(x, adapter_names=["default", "other", "__base__", "default"])  # a mixed batch
        assert not taken
        ours.merge_adapter()
        merged = ours(x)
        assert not taken
        ours.unmerge_adapter()
        assert (merged - ours(x)).abs().max() <= 1e-5 and len(taken) == 2
        handle = ours.base_model.model.lin0.base_layer.register_forward_hook(lambda m, i, o: o * 0)
        assert (ours(x) - _general(ours, x)).abs().max() == 0
        assert len(taken) == 3  # lin1 only: lin0's base has a hook
        handle.remove()


def test_steps_aside_for_other_dtypes_and_variants(taken):
    _, ours = _models()
    with torch.no_grad():
        ours.half()(torch.randn(2, 12).half())  # half precision keeps HF's separate roundings
        assert not taken
    hf, ours = _models(use_dora=True)
    x = torch.randn(2, 12)
    with torch.no_grad():
        assert (ours(x) - hf(x)).abs().max() <= 1e-5
    assert not taken


def test_lowrank_family_layer_and_overrides(taken):
    """A ``LowRankForwards`` layer (DeLoRA) takes the path; one that overrides ``adapted_forward``
    (VB-LoRA) keeps its own forward."""
    torch.manual_seed(0)
    base = _MLP()
    delora = pk.get_peft_model(copy.deepcopy(base), pk.DeloraConfig(r=4, target_modules=["lin0", "lin1"])).eval()
    x = torch.randn(3, 12)
    with torch.no_grad():
        out = delora(x)
        assert len(taken) == 2 and torch.equal(out, _general(delora, x))
    vblora = pk.get_peft_model(copy.deepcopy(base), pk.VBLoRAConfig(r=2, num_vectors=8, vector_length=4,
                                                                      target_modules=["lin0", "lin1"])).eval()
    with torch.no_grad():
        vblora(x)
    assert len(taken) == 2


@pytest.mark.parametrize("options", [{}, {"lora_bias": True}])
def test_large_batches_fold_the_adapters_into_a_temporary_weight(taken, monkeypatch, options):
    """Prefill-sized inputs take ``W + scale * B @ A`` (one GEMM): equal to the unfolded path and
    HF within float32 error, with several active adapters too; the layers' weights are untouched."""
    folds = []
    real = single._folded
    monkeypatch.setattr(single, "_folded", lambda *args: folds.append(1) or real(*args))
    hf, ours = _models(**options)
    weight = ours.base_model.model.lin0.base_layer.weight.detach().clone()
    x = torch.randn(4, 16, 12)  # 64 tokens: past FOLD_RATIO for 12 -> 20 and 20 -> 12
    with torch.no_grad():
        for adapters in ("default", ["default", "other"]):
            hf.base_model.set_adapter(adapters)
            ours.base_model.set_adapter(adapters)
            out = ours(x)
            assert (out - _general(ours, x)).abs().max() <= 1e-5
            assert (out - hf(x)).abs().max() <= 1e-5
        small = ours(x[:1, :2])  # 2 tokens: the thin GEMMs, bit-equal to the general path
        assert torch.equal(small, _general(ours, x[:1, :2]))
    assert len(folds) == 4 and len(taken) == 6
    assert torch.equal(ours.base_model.model.lin0.base_layer.weight, weight)
