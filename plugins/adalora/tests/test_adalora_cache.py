"""AdaLoRA's folded factors ``A * E`` and ``ranknum`` are cached for the stacked kernels (one
freshness check per call): mixed batches and single runs follow in-place writes to ``E`` (rank
masking) and to ``ranknum``, against merged models (``delta_weight`` reads the tensors directly), and
gradients through a mixed batch equal those of single-adapter runs."""

from __future__ import annotations

import copy

import torch

from peft_kernel import AdaLoraConfig, get_peft_model
from peft_kernel_testing import make_inputs, make_model
from peft_kernel_testing.hf_oracle import run
from peft_kernel_testing.mixed_checks import check_mixed_gradients_equal_single_runs

KW = dict(target_modules=["lin0", "lin1"], init_r=4, total_step=10, init_lora_weights=False)
NAMES = ["two", "__base__", "one", "two"]


def _model():
    torch.manual_seed(0)
    model = get_peft_model(make_model("mlp"), AdaLoraConfig(**KW), adapter_name="one")
    model.add_adapter("two", AdaLoraConfig(**KW, inference_mode=True))
    with torch.no_grad():  # N(0, 1) triplets: keep the outputs near 1 for float32 comparisons
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(0.3)
    return model.eval()


def _check_against_merged(model, inputs):
    expected = {"__base__": run(copy.deepcopy(model).unload(), inputs)}
    for name in ("one", "two"):
        merged = copy.deepcopy(model)
        merged.set_adapter(name)
        expected[name] = run(merged.merge_and_unload(), inputs)
    mixed = run(model, inputs, adapter_names=NAMES)
    for row, name in enumerate(NAMES):
        assert (mixed[row] - expected[name][row]).abs().max() <= 1e-5, (row, name)
    for name in ("one", "two"):
        model.set_adapter(name)
        assert (run(model, inputs) - expected[name]).abs().max() <= 1e-5, name


def test_mixed_and_single_runs_follow_in_place_writes_to_e_and_ranknum():
    model = _model()
    inputs = make_inputs("mlp")
    _check_against_merged(model, inputs)
    layer = model.base_model.model.lin1
    with torch.no_grad():
        layer.lora_E["two"][1] = 0.0  # a masking step
    _check_against_merged(model, inputs)
    with torch.no_grad():
        layer.ranknum["two"].fill_(2.0)
        layer.lora_E["one"].mul_(3.0)
    _check_against_merged(model, inputs)


def test_gradients_through_a_mixed_batch_equal_single_adapter_runs():
    check_mixed_gradients_equal_single_runs(_model(), make_inputs("mlp"), NAMES, "lora_")
