"""CPT against HF PEFT (the oracle) on tiny Llama and GPT-2: the same context gives HF's virtual
tokens, training gives HF's losses and parameters step by step (token-type masks, epsilon
projection, decayed loss), checkpoints cross-load both ways, generate equals greedy decoding, and
rows of a mixed batch equal single runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import peft_kernel
from peft_kernel import PeftModel, get_peft_model
from peft_kernel.errors import ConfigError, MixedBatchError
from peft_kernel_cpt import CPTConfig
from peft_kernel_testing import make_model, max_abs_diff, perturb, run
from peft_kernel_testing.generation import check_generate_matches_greedy, greedy_decode
from peft_kernel_testing.hf_oracle import hf_oracle

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")

IDS = torch.tensor([[13, 14, 15, 16, 17, 18], [20, 21, 22, 23, 24, 25], [30, 31, 32, 33, 34, 35]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
# the input example's types, numbered from 1 (0: padding); labels -100 where nothing is learned
TYPES = torch.tensor([[1, 2, 3, 4, 5, 8], [0, 1, 2, 3, 4, 4], [1, 1, 2, 3, 4, 4]])
LABELS = torch.where(TYPES % 4 == 0, IDS, -100)
LABELS[0, 5] = IDS[0, 5]
TOL = 1e-5
CONTEXT = {"cpt_token_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], "cpt_tokens_type_mask": [0, 1, 2, 3, 4, 5, 6, 7, 8, 8]}


def _kw(**kw):
    return {"task_type": "CAUSAL_LM", **CONTEXT, "opt_projection_epsilon": 0.5, "opt_projection_format_epsilon": 0.2, **kw}


def _logits(model, **inputs) -> torch.Tensor:
    return run(model, inputs)


def _trained(model, steps: int = 3, seed: int = 0):
    """``model`` after ``steps`` Adam steps on the CPT loss; returns it and the losses. The seed
    fixes the dropout masks (GPT-2's) so that two implementations see the same ones."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        # HF PEFT adds the context's numbering to input_type_mask in place: it gets a copy
        out = model(input_ids=IDS, attention_mask=MASK, labels=LABELS, input_type_mask=TYPES.clone())
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return model.eval(), losses


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("loss_type, decay", [("none", 1.0), ("decay", 0.7)])
def test_training_gives_hfs_losses_and_parameters(kind, loss_type, decay):
    kw = _kw(opt_weighted_loss_type=loss_type, opt_loss_decay_factor=decay)
    ours = get_peft_model(make_model(kind), CPTConfig(**kw))
    mine = ours.prompt_encoder["default"]
    assert torch.equal(mine.embedding.weight, make_model(kind).get_input_embeddings().weight[CONTEXT["cpt_token_ids"]])
    ours, our_losses = _trained(ours)
    with hf_oracle("HF peft training a CPT adapter"):
        hf, hf_losses = _trained(peft.get_peft_model(make_model(kind), peft.CPTConfig(**kw)))
        theirs = hf.prompt_encoder["default"].state_dict()
        expected = _logits(hf, input_ids=IDS, attention_mask=MASK)
    assert max(abs(a - b) for a, b in zip(our_losses, hf_losses)) <= TOL
    assert all(max_abs_diff(v, theirs[k]) <= TOL for k, v in mine.state_dict().items())
    assert max_abs_diff(_logits(ours, input_ids=IDS, attention_mask=MASK), expected) <= TOL
    delta = mine.delta_embedding.weight
    assert delta.norm(dim=1).max() > 0
    frozen = [i for i, t in enumerate(CONTEXT["cpt_tokens_type_mask"]) if t == 0 or t % 4 == 0]
    assert delta[frozen].norm(dim=1).max() <= 1e-9  # label and untyped tokens do not move
    assert (delta.norm(dim=1) <= mine.epsilon * (1 + 1e-5)).all()  # projected by the forward above


def test_only_the_delta_trains_and_the_base_stays():
    model = get_peft_model(make_model("llama"), CPTConfig(**_kw()))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.default.delta_embedding.weight"]
    base = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    _trained(model, steps=2)
    assert all(torch.equal(v, model.get_base_model().state_dict()[k]) for k, v in base.items())


def test_loss_without_input_types_counts_every_input_token_as_hf():
    model = get_peft_model(make_model("llama"), CPTConfig(**_kw()))
    with torch.no_grad():
        ours = model(input_ids=IDS, labels=IDS).loss
    with hf_oracle("HF peft's CPT loss without input_type_mask"):
        hf = peft.get_peft_model(make_model("llama"), peft.CPTConfig(**_kw()))
        with torch.no_grad():
            theirs = hf(input_ids=IDS, labels=IDS).loss
    assert abs(ours.item() - theirs.item()) <= TOL
    assert model(input_ids=IDS).loss is None


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cross_load_both_ways_and_generate(kind, tmp_path):
    with hf_oracle("HF peft saving a trained CPT adapter"):
        hf, _ = _trained(peft.get_peft_model(make_model(kind), peft.CPTConfig(**_kw())), steps=2)
        hf.save_pretrained(tmp_path / "hf")
        expected = _logits(hf, input_ids=IDS, attention_mask=MASK)
        hf_tokens, _ = greedy_decode(hf, IDS, MASK, max_new_tokens=4)
    ours = PeftModel.from_pretrained(make_model(kind), tmp_path / "hf")
    assert max_abs_diff(_logits(ours, input_ids=IDS, attention_mask=MASK), expected) <= TOL
    assert torch.equal(check_generate_matches_greedy(ours, IDS, MASK, max_new_tokens=4), hf_tokens)

    mine, _ = _trained(get_peft_model(make_model(kind), CPTConfig(**_kw())), steps=2)
    mine.save_pretrained(tmp_path / "ours")
    assert list(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == ["prompt_embeddings"]
    with hf_oracle("HF peft loading our CPT adapter"):
        theirs = peft.PeftModel.from_pretrained(make_model(kind), tmp_path / "ours")
        got = _logits(theirs, input_ids=IDS, attention_mask=MASK)
    assert max_abs_diff(got, _logits(mine, input_ids=IDS, attention_mask=MASK)) <= TOL


def test_mixed_batch_rows_equal_single_runs_and_generate():
    model = get_peft_model(make_model("llama"), CPTConfig(**_kw()))
    model.add_adapter("other", CPTConfig(**_kw(cpt_token_ids=list(range(30, 40)))))
    perturb(model.prompt_encoder, 3, scale=0.01)
    model.eval()
    names = ["other", "default", "other"]
    mixed = _logits(model, input_ids=IDS, attention_mask=MASK, adapter_names=names)
    for row, name in enumerate(names):
        model.set_adapter(name)
        single = _logits(model, input_ids=IDS[row: row + 1], attention_mask=MASK[row: row + 1])
        assert max_abs_diff(mixed[row: row + 1], single) <= TOL, (row, name)
    check_generate_matches_greedy(model, IDS, MASK, max_new_tokens=3, adapter_names=names)
    with pytest.raises(MixedBatchError, match="labels for one adapter"):
        model(input_ids=IDS, labels=IDS, adapter_names=names)


def test_config_fields_defaults_and_derived_values_match_hf():
    ours = CPTConfig(task_type="CAUSAL_LM")
    theirs = peft.CPTConfig(task_type="CAUSAL_LM")
    assert set(ours.to_dict()) == {f.name for f in dataclasses.fields(peft.CPTConfig)}
    for name in ("cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask", "num_virtual_tokens", "opt_weighted_loss_type",
                 "opt_loss_decay_factor", "opt_projection_epsilon", "opt_projection_format_epsilon"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[4, 5, 6], num_virtual_tokens=9).num_virtual_tokens == 3
    assert peft_kernel.CPTConfig is CPTConfig


@pytest.mark.parametrize("kwargs, message", [
    ({"task_type": "SEQ_CLS"}, "only supports task_type = CAUSAL_LM"),
    ({"task_type": None}, "only supports task_type = CAUSAL_LM"),
    ({"cpt_token_ids": [1, 2], "cpt_mask": [1]}, "must have the same length"),
    ({"cpt_token_ids": []}, "at least one token"),
    ({"cpt_tokens_type_mask": [-1]}, "cpt_tokens_type_mask"),
    ({"opt_weighted_loss_type": "linear"}, "opt_weighted_loss_type"),
    ({"opt_loss_decay_factor": 0}, "opt_loss_decay_factor"),
    ({"opt_projection_epsilon": -0.1}, "opt_projection_epsilon"),
])
def test_bad_configs_name_the_field(kwargs, message):
    kwargs = {"task_type": "CAUSAL_LM", **kwargs}
    with pytest.raises(ConfigError, match=message):
        CPTConfig(**kwargs)
