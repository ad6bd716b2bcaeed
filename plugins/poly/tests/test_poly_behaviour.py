"""Poly's specifics: the formula by hand, rows of different tasks (and adapters) equal single runs,
generate with ``task_ids`` equals greedy decoding through the forward (and HF's tokens), training
changes only adapter parameters, merging is refused as in HF, and bad configs / task ids are named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel import ConfigError, MixedBatchError, get_peft_model
from peft_kernel_poly import PolyConfig
from peft_kernel_poly.layers import PolyLinear
from peft_kernel_testing import make_model, max_abs_diff, perturb, run
from peft_kernel_testing.generation import check_generate_matches_greedy, greedy_decode
from peft_kernel_testing.hf_oracle import hf_oracle

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")

TOL = 1e-5
IDS = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 11, 12, 13], [0, 0, 21, 22, 23], [7, 7, 7, 8, 9]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
TASKS = torch.tensor([0, 2, 1, 2])
KW = dict(task_type="CAUSAL_LM", r=4, n_tasks=3, n_skills=3, n_splits=2)


def _llama(seed: int = 1, **kw) -> peft_kernel.PeftModel:
    model = get_peft_model(make_model("llama"), PolyConfig(**{**KW, **kw}))
    perturb(model, seed, scale=0.5)
    return model.eval()


def test_config_is_exported_and_hfs_defaults():
    assert peft_kernel.PolyConfig is PolyConfig
    ours, theirs = PolyConfig().to_dict(), peft.PolyConfig().to_dict()
    for key in ("r", "n_tasks", "n_skills", "n_splits", "poly_type", "init_weights", "target_modules"):
        assert ours[key] == theirs[key], key


def test_delta_is_the_per_row_mixture_by_hand():
    """Row b of task t: per split q, w = sigmoid(logits[t, q]) / sum; A_t stacks sum_s w A[q, s]
    along the input features, B_t along the output features; delta = x A_t B_t / r."""
    torch.manual_seed(0)
    layer = PolyLinear(nn.Linear(6, 4).double())
    layer.update_layer("a", PolyConfig(r=3, n_tasks=2, n_skills=3, n_splits=2, init_weights=False), "lin")
    layer.eval()
    with torch.no_grad():
        layer.poly_router["a"].module_logits.normal_()
    a, b = layer.poly_lora_A["a"].detach(), layer.poly_lora_B["a"].detach()
    logits = layer.poly_router["a"].module_logits.detach()
    x, tasks = torch.randn(3, 5, 6, dtype=torch.double), torch.tensor([1, 0, 1])
    for row, task in enumerate(tasks.tolist()):
        w = torch.sigmoid(logits[task]).view(2, 3)
        w = w / w.sum(-1, keepdim=True)
        a_t = torch.cat([sum(w[q, s] * a[q, s] for s in range(3)) for q in range(2)], dim=0)  # [6, r]
        b_t = torch.cat([sum(w[q, s] * b[q, s] for s in range(3)) for q in range(2)], dim=1)  # [r, 4]
        got = layer.row_delta(x[row: row + 1], "a", tasks[row: row + 1]).detach()[0]
        torch.testing.assert_close(got, x[row] @ a_t @ b_t / 3, rtol=0, atol=1e-12)


def test_rows_of_different_tasks_equal_single_task_runs():
    model = _llama()
    mixed = run(model, dict(input_ids=IDS, attention_mask=MASK), task_ids=TASKS)
    for row, task in enumerate(TASKS.tolist()):
        single = run(model, dict(input_ids=IDS[row: row + 1], attention_mask=MASK[row: row + 1]), task_ids=[task])
        assert max_abs_diff(mixed[row: row + 1], single) <= TOL, row


def test_two_dimensional_inputs_equal_a_sequence_of_one():
    """HF's layer needs [batch, seq, features] (bmm); ours also takes [batch, features]."""
    model = get_peft_model(make_model("mlp"), PolyConfig(target_modules=["lin0", "lin1"], r=2, n_tasks=3, n_splits=2))
    perturb(model, 1, scale=0.5)
    x = torch.randn(4, 10)
    flat = run(model.eval(), dict(x=x), task_ids=TASKS)
    assert max_abs_diff(flat, run(model, dict(x=x.unsqueeze(1)), task_ids=TASKS)[:, 0]) <= 1e-6


def test_mixed_adapters_and_tasks_equal_single_runs():
    """Oracle: single-adapter runs. HF peft 0.21.2 accepts ``adapter_names`` with Poly and silently
    serves every row with the active adapter (rows of "other" off by 0.15, "__base__" rows by 0.09)."""
    model = _llama()
    model.add_adapter("other", PolyConfig(**{**KW, "n_tasks": 2, "r": 2, "n_splits": 4}))
    perturb(model, 5, scale=0.5)
    model.eval()
    names, tasks = ["default", "other", "__base__", "other"], torch.tensor([2, 1, 0, 0])
    inputs = dict(input_ids=IDS, attention_mask=MASK)
    mixed = run(model, inputs, task_ids=tasks, adapter_names=names)
    for row, (name, task) in enumerate(zip(names, tasks.tolist())):
        one = dict(input_ids=IDS[row: row + 1], attention_mask=MASK[row: row + 1])
        if name == "__base__":
            with model.disable_adapter():
                single = run(model, one)
        else:
            model.set_adapter(name)
            single = run(model, one, task_ids=[task])
        assert max_abs_diff(mixed[row: row + 1], single) <= TOL, (row, name)


def test_generate_with_task_ids_equals_greedy_decoding_and_hfs_tokens():
    model = _llama()
    tokens = check_generate_matches_greedy(model, IDS, MASK, max_new_tokens=4, task_ids=TASKS)
    with hf_oracle("HF peft generating with Poly"):
        hf = peft.get_peft_model(make_model("llama"), peft.PolyConfig(**KW))
        hf.load_state_dict(model.state_dict())
        hf_tokens = hf.eval().generate(input_ids=IDS, attention_mask=MASK, task_ids=TASKS, max_new_tokens=4,
                                       do_sample=False)
    assert torch.equal(tokens, hf_tokens)
    beams = model.generate(input_ids=IDS, attention_mask=MASK, task_ids=TASKS, max_new_tokens=2, do_sample=False,
                           num_beams=2, num_return_sequences=2)
    assert beams.shape[0] == 8  # task ids repeated for each row's beams
    expected, _ = greedy_decode(model, IDS[1:2], MASK[1:2], max_new_tokens=4, task_ids=[2])
    assert torch.equal(tokens[1:2], expected)


def test_training_changes_only_adapter_parameters():
    model = _llama()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(input_ids=IDS, attention_mask=MASK, labels=IDS, task_ids=TASKS)
    out.loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all("poly_" in n for n in trainable)
    assert any("module_logits" in n for n in changed)


def test_merging_is_refused_as_in_hf_and_unload_gives_the_base():
    model = _llama()
    with hf_oracle("HF peft merging Poly"):
        hf = peft.get_peft_model(make_model("llama"), peft.PolyConfig(**KW))
        with pytest.raises(NotImplementedError):
            hf.merge_and_unload()
    with pytest.raises(NotImplementedError, match="task_ids"):
        model.merge_adapter()
    with pytest.raises(NotImplementedError, match="task_ids"):
        model.merge_and_unload()
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, PolyLinear))
    base = model.unload()
    assert max_abs_diff(run(base, dict(input_ids=IDS)), run(make_model("llama"), dict(input_ids=IDS))) == 0


@pytest.mark.parametrize("field, value, match", [
    ("poly_type", "mhr", "poly_type"),
    ("r", 0, r"\$\.r "),
    ("n_tasks", 0, "n_tasks"),
    ("n_skills", 0, "n_skills"),
    ("n_splits", 0, "n_splits"),
    ("n_splits", True, "n_splits"),
])
def test_bad_configs_name_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        PolyConfig(**{field: value})


def test_unknown_kwargs_and_unsplittable_features_are_named():
    with pytest.raises(TypeError, match="n_task"):
        PolyConfig(n_task=2)
    with pytest.raises(ConfigError, match=r"n_splits=3 .*in_features \(10\) of 'lin0'"):
        get_peft_model(make_model("mlp"), PolyConfig(target_modules=["lin0"], n_splits=3))
    with pytest.raises(ConfigError, match=r"n_splits=8 .*out_features \(4\) of 'lin2'"):
        get_peft_model(make_model("mlp"), PolyConfig(target_modules=["lin2"], n_splits=8, r=5))
    with pytest.raises(Exception, match="Conv1D"):  # HF's Poly adapts nn.Linear only
        get_peft_model(make_model("gpt2"), PolyConfig(task_type="CAUSAL_LM", target_modules=["c_attn"]))


def test_missing_or_bad_task_ids_are_named():
    model = _llama()
    inputs = dict(input_ids=IDS, attention_mask=MASK)
    with pytest.raises(MixedBatchError, match="Poly needs task_ids"):
        run(model, inputs)
    with pytest.raises(MixedBatchError, match="Poly needs task_ids"):
        model.generate(**inputs, max_new_tokens=2)
    with pytest.raises(MixedBatchError, match=r"from 0 to n_tasks - 1 = 2 .*\[0, 3\]"):
        run(model, inputs, task_ids=[0, 3, 0, 0])
    with pytest.raises(MixedBatchError, match="task_ids has 3 entries"):
        run(model, inputs, task_ids=[0, 1, 2])
    with pytest.raises(MixedBatchError, match="integer task id"):
        run(model, inputs, task_ids=torch.tensor([0.0, 1.0, 0.0, 0.0]))
