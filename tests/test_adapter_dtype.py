"""Adapters on a float16 / bfloat16 base, against HF ``peft`` (issue 19, item 7).

HF PEFT's rule, kept here: a new adapter's tensors take the base layer's float dtype (so their
values are representable in it), then ``autocast_adapter_dtype=True`` (the default of
``get_peft_model``, ``add_adapter``, ``load_adapter`` and ``from_pretrained``) upcasts float16 /
bfloat16 to float32; with ``False`` they stay in the base dtype; ``inject_adapter_in_model`` never
upcasts. Values, dtypes and outputs equal HF's.
"""

from __future__ import annotations

import pytest
import torch

import peft_kernel as pk
from peft_kernel_testing import make_inputs, make_model
from peft_kernel_testing.hf_oracle import max_abs_diff, perturb, run

peft = pytest.importorskip("peft")

HALF = [torch.bfloat16, torch.float16]
TARGETS = ["q_proj", "v_proj", "embed_tokens"]
DORA_HALF_TOL = {torch.bfloat16: 4e-3, torch.float16: 5e-4}
"""DoRA kept in half precision (``autocast_adapter_dtype=False``) computes its factor in another
order than HF (additive form, see ``peft_kernel_lora.dora``): outputs (|y| <= 0.26 here) move by a
few units in the last place. Everything else matches HF bit for bit."""


def adapter_tensors(model):
    """``{key: tensor}`` of LoRA tensors with HF's in-memory keys (DoRA's magnitude normalised)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            out[name.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")] = tensor
    return out


def assert_same_adapters(ours, hf):
    mine, theirs = adapter_tensors(ours), adapter_tensors(hf)
    assert sorted(mine) == sorted(theirs)
    for key in theirs:
        assert mine[key].dtype == theirs[key].dtype, key
        assert torch.equal(mine[key], theirs[key]), key


def build(lib, dtype, seed=5, **kwargs):
    model = make_model("llama").to(dtype)
    torch.manual_seed(seed)
    config = lib.LoraConfig(target_modules=TARGETS, use_dora=kwargs.pop("use_dora", False))
    return lib.get_peft_model(model, config, **kwargs)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_new_adapter_dtypes_values_and_outputs_match_hf(dtype, autocast, dora):
    hf = build(peft, dtype, autocast_adapter_dtype=autocast, use_dora=dora)
    ours = build(pk, dtype, autocast_adapter_dtype=autocast, use_dora=dora)
    assert_same_adapters(ours, hf)
    expected = torch.float32 if autocast else dtype
    assert {t.dtype for t in adapter_tensors(ours).values()} == {expected}
    assert all(p.dtype == dtype for n, p in ours.named_parameters() if "lora_" not in n)
    for model in (hf, ours):
        perturb(model, 0, scale=0.05)
    assert_same_adapters(ours, hf)
    inputs = make_inputs("llama")
    theirs, mine = run(hf.eval(), inputs), run(ours.eval(), inputs)
    assert mine.dtype == theirs.dtype == dtype
    assert max_abs_diff(mine, theirs) <= (DORA_HALF_TOL[dtype] if dora and not autocast else 0.0)
    # a backward pass in the base dtype reaches float32 adapter gradients
    ours.train()
    loss = ours(**inputs).logits.float().square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in ours.parameters() if p.requires_grad)


@pytest.mark.parametrize("autocast", [True, False])
def test_add_adapter_follows_autocast_like_hf(autocast):
    hf, ours = build(peft, torch.bfloat16), build(pk, torch.bfloat16)
    for lib, model in ((peft, hf), (pk, ours)):
        torch.manual_seed(9)
        model.add_adapter("second", lib.LoraConfig(target_modules=["o_proj"]), autocast_adapter_dtype=autocast)
    assert_same_adapters(ours, hf)
    assert {t.dtype for k, t in adapter_tensors(ours).items() if ".second" in k} == {
        torch.float32 if autocast else torch.bfloat16}


@pytest.mark.parametrize("autocast", [True, False])
def test_loading_onto_a_half_precision_base_matches_hf(tmp_path, autocast):
    source = build(peft, torch.float32)
    perturb(source, 1)
    source.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(make_model("llama").to(torch.bfloat16), str(tmp_path),
                                        autocast_adapter_dtype=autocast)
    ours = pk.PeftModel.from_pretrained(make_model("llama").to(torch.bfloat16), tmp_path,
                                        autocast_adapter_dtype=autocast)
    assert_same_adapters(ours, hf)
    hf.load_adapter(str(tmp_path), "again", autocast_adapter_dtype=autocast)
    ours.load_adapter(tmp_path, "again", autocast_adapter_dtype=autocast)
    assert_same_adapters(ours, hf)
    inputs = make_inputs("llama")
    assert max_abs_diff(run(ours, inputs), run(hf, inputs)) == 0


def test_inject_adapter_in_model_keeps_the_base_dtype_like_hf():
    models = []
    for lib in (peft, pk):
        torch.manual_seed(3)
        models.append(lib.inject_adapter_in_model(lib.LoraConfig(target_modules=TARGETS),
                                                  make_model("llama").to(torch.float16)))
    hf, ours = models
    assert_same_adapters(ours, hf)
    assert {t.dtype for t in adapter_tensors(ours).values()} == {torch.float16}


def test_full_precision_bases_keep_their_dtype_like_hf():
    assert_same_adapters(build(pk, torch.float32), build(peft, torch.float32))
    ours64, hf64 = build(pk, torch.float64), build(peft, torch.float64)
    # dtypes only: on a float64 base the LoRA plugin draws its initial values in float64, HF in float32
    assert {t.dtype for t in adapter_tensors(ours64).values()} == {t.dtype for t in adapter_tensors(hf64).values()} == {
        torch.float64}


OTHER_METHODS = {
    "IA3Config": dict(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "OFTConfig": dict(target_modules=["q_proj"], r=0, oft_block_size=4),
    "LoHaConfig": dict(target_modules=["q_proj"], init_weights=False),
    "LoKrConfig": dict(target_modules=["q_proj"], init_weights=False),
}


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("config_name", list(OTHER_METHODS))
def test_other_layer_methods_follow_the_same_dtype_rule_as_hf(config_name, autocast):
    if not hasattr(pk, config_name):
        pytest.skip(f"{config_name}'s plugin is not installed")
    models = []
    for lib in (peft, pk):
        model = make_model("llama").to(torch.bfloat16)
        torch.manual_seed(5)
        peft_model = lib.get_peft_model(model, getattr(lib, config_name)(**OTHER_METHODS[config_name]),
                                        autocast_adapter_dtype=autocast)
        perturb(peft_model, 0, scale=0.05)
        models.append(peft_model.eval())
    hf, ours = models
    trainable = {p.dtype for p in ours.parameters() if p.requires_grad}
    assert trainable == {p.dtype for p in hf.parameters() if p.requires_grad} == {
        torch.float32 if autocast else torch.bfloat16}
    inputs = make_inputs("llama")
    assert max_abs_diff(run(ours, inputs), run(hf, inputs)) == 0
