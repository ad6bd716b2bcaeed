"""AdaLoRA's own behaviour against HF peft (the oracle, run, never read): rank reallocation over a
training run (importance EMAs, budget schedule, masks of ``E``, ``rank_pattern``) and the
orthogonal regularisation give HF's parameters and masks; checkpoints after reallocation move both
ways; mixed batches; HF's refusals and config checks."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from peft_kernel import AdaLoraConfig, PeftModel, get_peft_model
from peft_kernel.plugin_api import ConfigError
from peft_kernel_testing import make_inputs, make_model
from peft_kernel_testing.hf_oracle import hf_oracle, hf_peft, run

TOL = 1e-5
SCHEDULE = dict(init_r=4, target_r=2, total_step=10, tinit=2, tfinal=3, deltaT=2)


def _pair(kind: str, **kwargs):
    """HF's model and ours with the same base and the same starting adapter (HF's)."""
    peft = hf_peft()
    with hf_oracle("HF peft building the AdaLoRA model"):
        theirs = peft.get_peft_model(make_model(kind), peft.AdaLoraConfig(**kwargs))
    ours = get_peft_model(make_model(kind), AdaLoraConfig(**kwargs))
    hf_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            param.copy_(hf_params[name])
    return theirs, ours


def _hf_pattern(model) -> dict[str, list[bool]]:
    """HF's in-memory ``rank_pattern`` keys carry the adapter name until it saves; ours never do."""
    pattern = model.peft_config["default"].rank_pattern or {}
    return {key.replace(".default", ""): mask for key, mask in pattern.items()}


def _train(model, inputs: dict, steps: int, optimizer: str, loss_fn) -> list[dict[str, list[bool]]]:
    opt = (torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD)(
        [p for p in model.parameters() if p.requires_grad], lr=0.05 if optimizer == "adamw" else 0.5)
    model.train()
    patterns = []
    for step in range(steps):
        loss_fn(model, inputs).backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
        patterns.append(dict(model.peft_config["default"].rank_pattern or {}))
    return patterns


def _mse(model, inputs):
    return model(**inputs).pow(2).mean()


def _lm_loss(model, inputs):
    return model(**inputs, labels=inputs["input_ids"]).loss


def _assert_same_parameters(theirs, ours) -> None:
    hf_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        assert (param - hf_params[name]).abs().max().item() <= TOL, name


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_rank_reallocation_over_a_run_equals_hf(optimizer: str) -> None:
    """Every step of a run through the whole schedule (warm-up, reduction every deltaT, final mask,
    masking with the final pattern): the same rank_pattern and the same parameters as HF's."""
    theirs, ours = _pair("mlp", target_modules=["lin0", "lin1", "lin2"], **SCHEDULE)
    inputs = make_inputs("mlp", batch=8)
    with hf_oracle("HF peft training AdaLoRA"):
        hf_patterns = []
        for pattern in _train(theirs, inputs, 12, optimizer, _mse):
            hf_patterns.append({key.replace(".default", ""): mask for key, mask in pattern.items()})
    our_patterns = _train(ours, inputs, 12, optimizer, _mse)
    assert our_patterns == hf_patterns
    assert not hf_patterns[3] and hf_patterns[4] and hf_patterns[-1]  # no mask before the reduction phase
    kept = sum(sum(mask) for mask in our_patterns[-1].values())
    assert kept == 2 * 3  # target_r per layer on average
    for path, mask in our_patterns[-1].items():  # the masked singular values stay zero
        layer = ours.base_model.model.get_submodule(path.removesuffix(".lora_E"))
        e = layer.lora_E["default"].detach().view(-1)
        assert torch.all(e[~torch.tensor(mask)] == 0)
    _assert_same_parameters(theirs, ours)


def test_orthogonal_regularisation_and_training_on_llama_equal_hf() -> None:
    """With labels, the loss carries orth_reg_weight times the mean ||AAᵀ - I|| / ||BᵀB - I||; the
    losses and the trained adapter equal HF's."""
    kwargs = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], orth_reg_weight=0.3, **SCHEDULE)
    theirs, ours = _pair("llama", **kwargs)
    inputs = make_inputs("llama")
    with torch.no_grad():
        plain = ours.get_base_model()(**inputs, labels=inputs["input_ids"]).loss
        ours_loss = _lm_loss(ours, inputs)
        with hf_oracle("HF peft's loss"):
            hf_loss = _lm_loss(theirs, inputs)
    assert abs(ours_loss.item() - hf_loss.item()) <= TOL
    assert ours_loss.item() > plain.item() + 0.1  # the regularisation is there (A and B start far from orthogonal)
    with hf_oracle("HF peft training AdaLoRA"):
        hf_patterns = [{k.replace(".default", ""): v for k, v in p.items()} for p in _train(theirs, inputs, 9, "adamw", _lm_loss)]
    assert _train(ours, inputs, 9, "adamw", _lm_loss) == hf_patterns
    _assert_same_parameters(theirs, ours)


def test_orth_reg_weight_must_be_positive_when_a_loss_is_computed() -> None:
    model = get_peft_model(make_model("llama"), AdaLoraConfig(task_type="CAUSAL_LM", orth_reg_weight=0, total_step=5))
    inputs = make_inputs("llama")
    model(**inputs)  # no labels, no loss: fine
    with pytest.raises(ValueError, match="orth_reg_weight should be greater than 0"):
        model(**inputs, labels=inputs["input_ids"])


def _trained_pair(tmp_path):
    theirs, ours = _pair("mlp", target_modules=["lin0", "lin1"], **SCHEDULE)
    inputs = make_inputs("mlp", batch=8)
    with hf_oracle("HF peft training AdaLoRA and saving it"):
        _train(theirs, inputs, 9, "sgd", _mse)
        theirs.save_pretrained(tmp_path / "hf")
    _train(ours, inputs, 9, "sgd", _mse)
    ours.save_pretrained(tmp_path / "ours")
    return theirs.eval(), ours.eval()


def test_checkpoints_after_reallocation_equal_hf_and_load_both_ways(tmp_path) -> None:
    """After reallocation HF saves the kept triplets only, with the masks in the config; ours writes
    the same files, and each library loads the other's with equal outputs."""
    from safetensors.torch import load_file

    theirs, ours = _trained_pair(tmp_path)
    hf_files, our_files = load_file(tmp_path / "hf" / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert hf_files.keys() == our_files.keys()
    for key, value in hf_files.items():
        assert value.shape == our_files[key].shape and (value - our_files[key]).abs().max() <= TOL, key
    assert any(value.shape[0] < 4 for key, value in our_files.items() if key.endswith("lora_E"))  # resized
    hf_config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert our_config["rank_pattern"] == hf_config["rank_pattern"] == ours.peft_config["default"].rank_pattern
    inputs = make_inputs("mlp")
    expected = run(ours, inputs)
    loaded = PeftModel.from_pretrained(make_model("mlp"), tmp_path / "hf")
    assert (run(loaded, inputs) - expected).abs().max() <= TOL
    with hf_oracle("HF peft loading our checkpoint"):
        hf_loaded = hf_peft().PeftModel.from_pretrained(make_model("mlp"), tmp_path / "ours").eval()
        got = run(hf_loaded, inputs)
    assert (got - expected).abs().max() <= TOL
    # reloaded adapters keep their per-layer ranks and ranknum (the initial rank, which scales the update)
    layer = loaded.base_model.model.lin1
    assert layer.r["default"] == sum(ours.peft_config["default"].rank_pattern["lin1.lora_E"])
    assert float(layer.ranknum["default"]) == 4.0
    # saved again, a loaded checkpoint is unchanged
    loaded.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert all(torch.equal(again[k], our_files[k]) for k in our_files)


def test_mixed_batch_of_reallocated_adapters_equals_single_runs(tmp_path) -> None:
    """Adapters of different per-layer ranks (after reallocation) serve one row each through the
    stacked low-rank kernels; every row equals its adapter's single run."""
    from peft_kernel_lowrank import mixed

    _, ours = _trained_pair(tmp_path)
    model = PeftModel.from_pretrained(make_model("mlp"), tmp_path / "ours", adapter_name="trained")
    model.load_adapter(tmp_path / "hf", adapter_name="hf")
    fresh = AdaLoraConfig(target_modules=["lin0", "lin1"], init_r=3, total_step=10, inference_mode=True)
    model.add_adapter("fresh", fresh)
    with torch.no_grad():  # E starts at zero: give the fresh adapter singular values
        for layer in (model.base_model.model.lin0, model.base_model.model.lin1):
            layer.lora_E["fresh"].copy_(torch.tensor([[5.0], [-3.0], [4.0]]))
    model.eval()
    inputs = {"x": make_inputs("mlp", batch=8)["x"]}
    names = ["trained", "__base__", "fresh", "hf", "fresh", "trained", "hf", "__base__"]
    singles = {}
    for name in ("trained", "hf", "fresh"):
        model.set_adapter(name)
        singles[name] = run(model, inputs)
    with model.disable_adapter():
        singles["__base__"] = run(model, inputs)
    got = run(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        assert (got[row] - singles[name][row]).abs().max() <= TOL, (row, name)
    layer = model.base_model.model.lin0
    assert mixed.get_stack(layer) is not None and set(mixed.get_stack(layer).names) == {"trained", "hf", "fresh"}


def test_one_trainable_adapter_as_in_hf() -> None:
    model = get_peft_model(make_model("mlp"), AdaLoraConfig(target_modules=["lin0"], total_step=10))
    with pytest.raises(ValueError, match="supports only 1 trainable adapter"):
        model.add_adapter("other", AdaLoraConfig(target_modules=["lin0"], total_step=10))
    assert "other" not in model.peft_config
    model.add_adapter("other", AdaLoraConfig(target_modules=["lin0"], total_step=10, inference_mode=True))
    assert model.base_model.trainable_adapter_name == "default"
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".other"))


def test_add_weighted_adapter_is_refused_as_in_hf() -> None:
    model = get_peft_model(make_model("mlp"), AdaLoraConfig(target_modules=["lin0"], total_step=10))
    model.add_adapter("other", AdaLoraConfig(target_modules=["lin0"], total_step=10, inference_mode=True))
    with pytest.raises(TypeError, match="AdaLoraModel does not support add_weighted_adapter"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "combined")
    assert "combined" not in model.peft_config


def test_update_and_allocate_needs_a_trainable_adapter(tmp_path) -> None:
    model = get_peft_model(make_model("mlp"), AdaLoraConfig(target_modules=["lin0"], total_step=10))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("mlp"), tmp_path)  # inference_mode
    with pytest.raises(ValueError, match="needs a trainable AdaLoRA adapter"):
        loaded.update_and_allocate(0)
    assert type(loaded.base_model).__name__ == "AdaLoraModel" and loaded.base_model.prefix == "lora_"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "total_step.*supply a value > 0"),
        ({"total_step": 0}, "total_step.*supply a value > 0"),
        ({"total_step": 10, "tinit": 5, "tfinal": 5}, "don't allow for a budgeting phase"),
        ({"total_step": 10, "use_dora": True}, "does not support DoRA"),
        ({"total_step": 10, "beta1": 1.5}, "beta1 must be in"),
        ({"total_step": 10, "init_r": 0}, "init_r"),
        ({"total_step": 10, "init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"total_step": 10, "use_qalora": True}, "use_qalora"),
        ({"total_step": 10, "rank_pattern": {"lin0.lora_E": [1, 0]}}, r"rank_pattern.*expected bool"),
    ],
)
def test_bad_configs_raise_named_errors(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        AdaLoraConfig(**kwargs)


def test_r_is_ignored_with_hf_warning() -> None:
    with pytest.warns(UserWarning, match="`r` is not used in AdaLora"):
        AdaLoraConfig(r=4, total_step=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaLoraConfig(total_step=10)


def test_half_precision_base_rounds_once_as_hf(tmp_path) -> None:
    """float32 adapters on a bfloat16 model: the delta is added in float32 and the sum rounded once
    (HF's ``result +=``), so the logits equal HF's bit for bit."""
    peft = hf_peft()
    inputs = make_inputs("llama")
    with hf_oracle("HF peft on a bfloat16 model"):
        theirs = peft.get_peft_model(make_model("llama").to(torch.bfloat16),
                                     peft.AdaLoraConfig(target_modules=["q_proj", "v_proj"], total_step=5,
                                                        init_lora_weights=False)).eval()
        expected = run(theirs, inputs)
        theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make_model("llama").to(torch.bfloat16), tmp_path).eval()
    assert ours.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].dtype == torch.float32
    assert torch.equal(run(ours, inputs), expected)


def test_mixed_model_stacks_adalora_on_lora_as_hf() -> None:
    """``PeftMixedModel``: an AdaLoRA layer stacked on a LoRA layer of the same module gives HF's
    output (the LoRA layer below must not answer for the AdaLoRA adapter)."""
    import peft_kernel

    peft = hf_peft()
    inputs = make_inputs("mlp")
    built = {}
    for name, lib in (("hf", peft), ("ours", peft_kernel)):
        model = lib.get_peft_model(make_model("mlp"), lib.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False),
                                   mixed=True)
        model.add_adapter("ada", lib.AdaLoraConfig(target_modules=["lin0"], total_step=5, init_lora_weights=False))
        model.set_adapter(["default", "ada"])
        built[name] = model.eval()
    hf_params = dict(built["hf"].named_parameters())
    with torch.no_grad():
        for name, param in built["ours"].named_parameters():
            param.copy_(hf_params[name])
    with hf_oracle("HF peft's mixed model"):
        expected = run(built["hf"], inputs)
    assert (run(built["ours"], inputs) - expected).abs().max() <= TOL


def test_safe_merge_refuses_non_finite_and_masked_triplets_merge_to_nothing() -> None:
    model = get_peft_model(make_model("mlp"), AdaLoraConfig(target_modules=["lin0"], init_r=3, total_step=10,
                                                            init_lora_weights=False)).eval()
    layer = model.base_model.model.lin0
    weight = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_E["default"].copy_(torch.tensor([[0.0], [0.0], [0.0]]))
    model.merge_adapter()
    assert torch.equal(layer.base_layer.weight, weight)  # every singular value masked: a zero update
    model.unmerge_adapter()
    with torch.no_grad():
        layer.lora_E["default"][1] = float("inf")
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, weight)
