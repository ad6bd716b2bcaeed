"""Poly against HF peft (the oracle): checkpoints cross-load both ways with equal outputs (eval mode,
``task_ids`` per row) on a toy MLP, tiny Llama and BERT sequence classification; the saved keys,
config, layer and model status and parameter counts are HF's; in training mode, the same seed draws
the same relaxed-Bernoulli skill weights as HF."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from peft_kernel import PeftModel, get_peft_model
from peft_kernel_poly import PolyConfig
from peft_kernel_testing import make_model, max_abs_diff, perturb, run
from peft_kernel_testing.hf_oracle import hf_oracle

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")

TOL = 1e-5
IDS = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 11, 12, 13], [0, 0, 21, 22, 23], [7, 7, 7, 8, 9]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
TASKS = torch.tensor([0, 2, 1, 2])
# HF's Poly layer multiplies with bmm, so it needs [batch, seq, features] inputs: the MLP gets a sequence
MLP_X = torch.randn(4, 3, 10, generator=torch.Generator().manual_seed(1))

CASES = {
    "mlp": dict(target_modules=["lin0", "lin1"], r=4, n_tasks=3, n_skills=2, n_splits=2),
    "llama": dict(task_type="CAUSAL_LM", r=4, n_tasks=3, n_skills=3, n_splits=4),
    "bert": dict(task_type="SEQ_CLS", r=2, n_tasks=3, n_skills=2, n_splits=1),
}


def _inputs(kind: str) -> dict:
    return {"x": MLP_X} if kind == "mlp" else {"input_ids": IDS, "attention_mask": MASK}


def _hf_out(model, kind: str) -> torch.Tensor:
    """HF's ``PeftModel.forward`` without a task type hands ``task_ids`` to the user's model (a
    ``TypeError`` for the MLP); its ``PolyModel`` takes them, so the MLP is run through it."""
    target = model.base_model if kind == "mlp" else model
    return run(target, _inputs(kind), task_ids=TASKS)


def _ours_out(model, kind: str) -> torch.Tensor:
    return run(model, _inputs(kind), task_ids=TASKS)


@pytest.mark.parametrize("kind", list(CASES))
def test_cross_load_both_ways(kind, tmp_path):
    with hf_oracle("HF peft saving a Poly adapter"):
        hf = peft.get_peft_model(make_model(kind), peft.PolyConfig(**CASES[kind]))
        perturb(hf, 1, scale=0.5)
        hf.eval().save_pretrained(tmp_path / "hf")
        expected = _hf_out(hf, kind)
    ours = PeftModel.from_pretrained(make_model(kind), tmp_path / "hf").eval()
    assert max_abs_diff(_ours_out(ours, kind), expected) <= TOL

    mine = get_peft_model(make_model(kind), PolyConfig(**CASES[kind]))
    perturb(mine, 2, scale=0.5)
    mine.eval().save_pretrained(tmp_path / "ours")
    with hf_oracle("HF peft loading our Poly adapter"):
        theirs = peft.PeftModel.from_pretrained(make_model(kind), tmp_path / "ours").eval()
        got = _hf_out(theirs, kind)
    assert max_abs_diff(got, _ours_out(mine, kind)) <= TOL


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_saved_keys_config_status_and_counts_are_hfs(kind, tmp_path):
    ours = get_peft_model(make_model(kind), PolyConfig(**CASES[kind]))
    with hf_oracle("HF peft building a Poly adapter"):
        hf = peft.get_peft_model(make_model(kind), peft.PolyConfig(**CASES[kind]))
        hf.save_pretrained(tmp_path / "hf")
        hf_status, hf_model_status = hf.get_layer_status(), hf.get_model_status()
        hf_counts = hf.get_nb_trainable_parameters()
    ours.save_pretrained(tmp_path / "ours")
    shapes = {p: {k: v.shape for k, v in load_file(tmp_path / p / "adapter_model.safetensors").items()} for p in ("ours", "hf")}
    assert shapes["ours"] == shapes["hf"]
    assert any(k.endswith("poly_router.module_logits") for k in shapes["ours"])
    configs = {p: json.loads((tmp_path / p / "adapter_config.json").read_text()) for p in ("ours", "hf")}
    for config in configs.values():
        config.pop("peft_version", None)
        config["target_modules"] = sorted(config["target_modules"])
    assert configs["ours"] == configs["hf"]
    assert [vars(s) for s in ours.get_layer_status()] == [vars(s) for s in hf_status]
    assert vars(ours.get_model_status()) == vars(hf_model_status)
    assert ours.get_nb_trainable_parameters() == hf_counts
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in hf.named_parameters() if p.requires_grad}


def test_fresh_adapter_is_the_identity_and_inits_like_hf():
    """B starts at zero (init_weights=True); the router logits start in [-1e-3, 1e-3]; the A blocks
    are drawn with the bound HF's have (1 / sqrt(r)); init_weights=False draws B too."""
    kw = CASES["mlp"]
    ours = get_peft_model(make_model("mlp"), PolyConfig(**kw)).eval()
    assert max_abs_diff(_ours_out(ours, "mlp"), run(make_model("mlp"), _inputs("mlp"))) == 0
    layer = ours.base_model.model.lin0
    assert layer.poly_router["default"].module_logits.abs().max() <= 1e-3
    assert 0.3 < layer.poly_lora_A["default"].abs().max() <= 0.5
    drawn = get_peft_model(make_model("mlp"), PolyConfig(**kw, init_weights=False)).base_model.model.lin0
    assert 0.3 < drawn.poly_lora_B["default"].abs().max() <= 0.5


def test_training_mode_draws_hfs_skill_weights_under_one_seed():
    """In training mode the router samples a relaxed Bernoulli (temperature 1) per row: under one seed
    the layers draw in the same order as HF's, so the outputs are equal."""
    with hf_oracle("HF peft running Poly in training mode"):
        hf = peft.get_peft_model(make_model("llama"), peft.PolyConfig(**CASES["llama"]))
        perturb(hf, 3, scale=0.5)
        hf.train()
        torch.manual_seed(7)
        expected = run(hf, _inputs("llama"), task_ids=TASKS)
    ours = get_peft_model(make_model("llama"), PolyConfig(**CASES["llama"]))
    ours.load_state_dict(hf.state_dict())
    ours.train()
    torch.manual_seed(7)
    got = run(ours, _inputs("llama"), task_ids=TASKS)
    assert max_abs_diff(got, expected) <= TOL
    assert max_abs_diff(got, run(ours.eval(), _inputs("llama"), task_ids=TASKS)) > 1e-4  # sampling is live


def test_half_precision_base_equals_hf():
    """On a bfloat16 Llama the adapters stay float32 (autocast) and the outputs are HF's bit for bit."""
    kw = CASES["llama"]
    ours = get_peft_model(make_model("llama").to(torch.bfloat16), PolyConfig(**kw))
    perturb(ours, 1, scale=0.5)
    assert all(p.dtype == torch.float32 for p in ours.parameters() if p.requires_grad)
    with hf_oracle("HF peft running Poly on a bfloat16 model"):
        hf = peft.get_peft_model(make_model("llama").to(torch.bfloat16), peft.PolyConfig(**kw))
        hf.load_state_dict(ours.state_dict())
        expected = _hf_out(hf.eval(), "llama")
    got = _ours_out(ours.eval(), "llama")
    assert got.dtype == torch.bfloat16 and max_abs_diff(got, expected) == 0
