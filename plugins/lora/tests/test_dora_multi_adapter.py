"""DoRA with other adapters active on the same layer, against HF ``peft``.

HF PEFT takes DoRA's norm on the bare base weight and lets the factor rescale the output so far
(base and the adapters applied before, bias excluded); merging does the same, so merged ==
unmerged. Mixed batches (one adapter per row) must keep matching single-adapter runs.
"""

from __future__ import annotations

import pytest
import torch

import peft_kernel as pk
from peft_kernel_testing.hf_oracle import max_abs_diff, perturb, run
from peft_kernel_testing.models import make_inputs, make_model

peft = pytest.importorskip("peft")

TARGETS = {"mlp": ["lin0", "lin1"], "conv2d": ["conv0", "conv1"], "embedding": ["emb"], "gpt2-conv1d": ["c_fc", "c_proj"]}
TOL = 1e-5


def build(kind: str, dora: set[str], dropout: float = 0.0):
    """(HF model, ours) with adapters ``x`` and ``y`` (DoRA where named), the same weights."""
    def config(lib, name):
        return lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=name in dora,
                              lora_dropout=dropout, init_lora_weights=False)

    hf = peft.get_peft_model(make_model(kind), config(peft, "x"), adapter_name="x")
    hf.add_adapter("y", config(peft, "y"))
    hf.base_model.set_adapter(["x", "y"])
    perturb(hf, 3)
    ours = pk.get_peft_model(make_model(kind), config(pk, "x"), adapter_name="x")
    ours.add_adapter("y", config(pk, "y"))
    for name in ("x", "y"):
        loaded = pk.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(hf, adapter_name=name), adapter_name=name)
        assert not loaded.missing_keys
    ours.set_adapter(["x", "y"])
    return hf.eval(), ours.eval()


@pytest.mark.parametrize("kind", list(TARGETS))
@pytest.mark.parametrize("order, dora", [(["x", "y"], {"y"}), (["y", "x"], {"y"}), (["x", "y"], {"x", "y"})],
                         ids=["lora-then-dora", "dora-then-lora", "dora-then-dora"])
def test_forward_and_merge_match_hf(kind, order, dora):
    hf, ours = build(kind, dora)
    inputs = make_inputs(kind)
    hf.base_model.set_adapter(order)
    ours.set_adapter(order)
    expected = run(hf, inputs)
    assert max_abs_diff(run(ours, inputs), expected) <= TOL, "unmerged forward differs from HF"
    ours.merge_adapter()
    assert max_abs_diff(run(ours, inputs), expected) <= TOL, "merged differs from unmerged"
    ours.unmerge_adapter()
    assert max_abs_diff(run(ours, inputs), expected) <= TOL, "unmerge did not restore the output"
    hf_merged = hf.merge_and_unload()
    ours_merged = ours.merge_and_unload()
    for (name, a), (_, b) in zip(sorted(hf_merged.state_dict().items()), sorted(ours_merged.state_dict().items())):
        assert max_abs_diff(a, b) <= TOL, f"merged weight {name} differs from HF's"


def test_merge_one_adapter_at_a_time_matches_merging_both():
    hf, ours = build("mlp", {"y"})
    inputs = make_inputs("mlp")
    expected = run(hf, inputs)
    ours.merge_adapter(["x"])
    ours.merge_adapter(["y"])  # DoRA's norm on the bare weight although x is merged already
    assert max_abs_diff(run(ours, inputs), expected) <= TOL
    ours.unmerge_adapter()
    assert max_abs_diff(run(ours, inputs), expected) <= TOL


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_forward_matches_hf(dropout):
    """In training with live dropout HF's DoRA rescales ``W·dropout(x)`` only; without, the output so far."""
    hf, ours = build("mlp", {"y"}, dropout=dropout)
    inputs = make_inputs("mlp")
    hf.train()
    ours.train()
    torch.manual_seed(11)
    expected = run(hf, inputs)
    torch.manual_seed(11)
    assert max_abs_diff(run(ours, inputs), expected) <= TOL


@pytest.mark.parametrize("kind", list(TARGETS))
def test_mixed_batch_rows_match_single_adapter_runs(kind):
    hf, ours = build(kind, {"y"})
    inputs = make_inputs(kind)
    names = ["y", "x", "__base__", "y"]
    single = {}
    for name in ("x", "y"):
        hf.base_model.set_adapter(name)
        single[name] = run(hf, inputs)
    with hf.disable_adapter():
        single["__base__"] = run(hf, inputs)
    mixed = run(ours, inputs, adapter_names=names)
    for row, name in enumerate(names):
        assert max_abs_diff(mixed[row], single[name][row]) <= TOL, f"row {row} ({name})"
