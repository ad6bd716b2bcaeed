"""VB-LoRA against HF peft and its own formula: the composed factors, the shared vector bank (one
parameter), the saved keys with and without ``save_only_topk_weights``, mixed batches through the
stacked kernels, merging, dtypes, and bad configs and checkpoints."""

import dataclasses
import json
import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_kernel import (CheckpointError, ConfigError, PeftModel, TargetNotFoundError, get_peft_model,
                         get_peft_model_state_dict, set_peft_model_state_dict)
from peft_kernel_testing import check_mixed_batch_against_hf, make_inputs, make_model, perturb, run
from peft_kernel_testing.hf_oracle import check_active_adapters_against_hf, hf_oracle
from peft_kernel_vblora import VBLoRAConfig
from peft_kernel_vblora.layers import VBLoRALinear
from peft_kernel_vblora.topk import index_dtype
from peft_kernel_lowrank import mixed
from peft_kernel.plugin_api import AdapterLayer

peft = pytest.importorskip("peft")

KWARGS = dict(target_modules=["lin0", "lin1", "lin2"], r=3, num_vectors=8, vector_length=2)


def _config(**kwargs):
    return VBLoRAConfig(**{**KWARGS, **kwargs})


def _hf_config(**kwargs):
    return peft.VBLoRAConfig(**{**KWARGS, **kwargs})


def _saved(model, folder):
    model.save_pretrained(folder)
    with open(f"{folder}/adapter_config.json") as f:
        config = json.load(f)
    config.pop("peft_version", None)
    return load_file(f"{folder}/adapter_model.safetensors"), config


def test_factors_are_top_k_mixtures_of_bank_vectors():
    """A's rows and B's columns are cut into sub-vectors; each is the softmax mixture of the bank
    vectors of its top-k logits; delta W = B @ A, computed by hand."""
    torch.manual_seed(0)
    layer = VBLoRALinear(torch.nn.Linear(4, 6).double())
    bank = torch.nn.Parameter(torch.randn(5, 2, dtype=torch.double))
    layer.update_layer("a", _config(r=2, topk=2, num_vectors=5), "lin", shared={"vblora_vector_bank": bank})
    la, lb = layer.vblora_logits_A["a"].detach(), layer.vblora_logits_B["a"].detach()
    a = torch.zeros(2, 4, dtype=torch.double)
    b = torch.zeros(6, 2, dtype=torch.double)
    for i in range(2):
        for j in range(2):
            top = la[i, j].topk(2)
            a[i, 2 * j:2 * j + 2] = (torch.softmax(top.values, 0)[:, None] * bank[top.indices]).sum(0).detach()
        for j in range(3):
            top = lb[j, i].topk(2)
            b[2 * j:2 * j + 2, i] = (torch.softmax(top.values, 0)[:, None] * bank[top.indices]).sum(0).detach()
    torch.testing.assert_close(layer.delta_weight("a").detach(), b @ a, rtol=0, atol=1e-12)
    x = torch.randn(3, 4, dtype=torch.double)
    torch.testing.assert_close(layer.delta(x, "a").detach(), x @ (b @ a).T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind, dtype", [("mlp", torch.float32), ("mlp", torch.float64), ("mlp", torch.bfloat16),
                                         ("gpt2", torch.float32)])
def test_one_seed_gives_hfs_adapter(kind, dtype):
    """The same random draws in HF's order (the bank redrawn in every layer before its logits):
    equal tensors for one seed, for a second adapter too."""
    kwargs = dict(r=2, num_vectors=6, vector_length=4)
    if kind == "mlp":
        kwargs.update(vector_length=2, target_modules=["lin0", "lin1", "lin2"])
    torch.manual_seed(3)
    with hf_oracle("HF peft building two VB-LoRA adapters"):
        hf = peft.get_peft_model(make_model(kind).to(dtype), peft.VBLoRAConfig(**kwargs))
        hf.add_adapter("b", peft.VBLoRAConfig(**kwargs))
    torch.manual_seed(3)
    ours = get_peft_model(make_model(kind).to(dtype), VBLoRAConfig(**kwargs))
    ours.add_adapter("b", VBLoRAConfig(**kwargs))
    theirs = dict(hf.named_parameters())
    mine = {n: p for n, p in ours.named_parameters() if "vblora" in n}
    assert mine and all(torch.equal(p, theirs[n]) for n, p in mine.items())


def test_the_bank_is_one_parameter_shared_by_every_layer():
    model = get_peft_model(make_model("mlp"), _config())
    layers = [model.base_model.model.lin0, model.base_model.model.lin1, model.base_model.model.lin2]
    bank = layers[0].vblora_vector_bank["default"]
    assert all(layer.vblora_vector_bank["default"] is bank for layer in layers)
    banks = [n for n, p in model.named_parameters() if p is bank]
    assert banks == [n for n, _ in model.named_parameters() if "vector_bank" in n] and len(banks) == 1
    with hf_oracle("HF peft building a VB-LoRA adapter"):
        hf = peft.get_peft_model(make_model("mlp"), _hf_config())
    assert model.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters() == (952, 1468)
    # every layer's gradient reaches the one bank; one optimizer step moves it everywhere
    model.train()
    run_out = model(**make_inputs("mlp"))
    run_out.pow(2).mean().backward()
    assert bank.grad is not None and bank.grad.abs().sum() > 0
    for layer in layers:
        assert layer.vblora_logits_A["default"].grad.abs().sum() > 0
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(layer.vblora_vector_bank["default"] is bank for layer in layers)


@pytest.mark.parametrize("topk_only", [False, True])
def test_saved_keys_dtypes_and_config_are_hfs(topk_only):
    ours = get_peft_model(make_model("mlp"), _config(save_only_topk_weights=topk_only, topk=3))
    with hf_oracle("HF peft building a VB-LoRA adapter"):
        hf = peft.get_peft_model(make_model("mlp"), _hf_config(save_only_topk_weights=topk_only, topk=3))
    with tempfile.TemporaryDirectory() as tmp:
        ours_sd, ours_json = _saved(ours, f"{tmp}/ours")
        hf_sd, hf_json = _saved(hf, f"{tmp}/hf")
    assert {k: (v.shape, v.dtype) for k, v in ours_sd.items()} == {k: (v.shape, v.dtype) for k, v in hf_sd.items()}
    assert "base_model.vblora_vector_bank" in ours_sd
    suffix = "_topk_weights" if topk_only else ""
    assert f"base_model.model.lin0.vblora_logits_A{suffix}" in ours_sd
    assert set(ours_json) == set(hf_json)
    for key in hf_json:
        assert ours_json[key] == hf_json[key] or sorted(ours_json[key]) == sorted(hf_json[key]), key


@pytest.mark.parametrize("num_vectors, dtype", [(255, torch.uint8), (256, torch.int16), (32767, torch.int16),
                                                (32768, torch.int32)])
def test_index_dtype_is_hfs(num_vectors, dtype):
    assert index_dtype(num_vectors) == dtype
    config = dict(target_modules=["lin2"], r=1, num_vectors=num_vectors, vector_length=4, save_only_topk_weights=True)
    with hf_oracle("HF peft's state dict of a top-k-only VB-LoRA adapter"):
        hf = peft.get_peft_model_state_dict(peft.get_peft_model(make_model("mlp"), peft.VBLoRAConfig(**config)))
    ours = get_peft_model_state_dict(get_peft_model(make_model("mlp"), VBLoRAConfig(**config)))
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in hf.items()}


def test_top_k_checkpoint_loads_for_inference_and_round_trips_in_memory():
    model = get_peft_model(make_model("mlp"), _config(save_only_topk_weights=True, topk=3))
    perturb(model, 4)
    model.eval()
    inputs = make_inputs("mlp")
    expected = run(model, inputs)
    state = get_peft_model_state_dict(model)
    assert not any(k.endswith(("vblora_logits_A", "vblora_logits_B")) for k in state)
    fresh = get_peft_model(make_model("mlp"), _config(save_only_topk_weights=True, topk=3)).eval()
    set_peft_model_state_dict(fresh, state)
    torch.testing.assert_close(run(fresh, inputs), expected, rtol=0, atol=1e-6)
    logits = fresh.base_model.model.lin0.vblora_logits_A["default"]
    assert torch.isfinite(logits).all()  # HF writes -inf; the lowest finite value mixes the same
    assert ((logits > torch.finfo(logits.dtype).min).sum(-1) == 3).all()
    with tempfile.TemporaryDirectory() as tmp:  # HF reads ours and ours reads HF's, for inference
        model.save_pretrained(tmp)
        loaded = PeftModel.from_pretrained(make_model("mlp"), tmp)
        assert not any(p.requires_grad for n, p in loaded.named_parameters() if "vblora" in n)
        torch.testing.assert_close(run(loaded, inputs), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(run(peft.PeftModel.from_pretrained(make_model("mlp"), tmp), inputs), expected,
                                   rtol=0, atol=1e-6)
        merged = PeftModel.from_pretrained(make_model("mlp"), tmp).merge_and_unload(safe_merge=True)
    torch.testing.assert_close(run(merged, inputs), expected, rtol=0, atol=1e-5)


def test_full_checkpoint_loads_into_a_top_k_config_and_back():
    """Either format loads whatever the config says: the keys decide."""
    inputs = make_inputs("mlp")
    full = get_peft_model(make_model("mlp"), _config())
    perturb(full, 2)
    expected = run(full.eval(), inputs)
    with tempfile.TemporaryDirectory() as tmp:
        full.save_pretrained(tmp)
        with open(f"{tmp}/adapter_config.json") as f:
            data = json.load(f)
        data["save_only_topk_weights"] = True
        with open(f"{tmp}/adapter_config.json", "w") as f:
            json.dump(data, f)
        loaded = PeftModel.from_pretrained(make_model("mlp"), tmp)
        torch.testing.assert_close(run(loaded, inputs), expected, rtol=0, atol=1e-6)
        loaded.save_pretrained(f"{tmp}/topk")
        assert any(k.endswith("_topk_indices") for k in load_file(f"{tmp}/topk/adapter_model.safetensors"))
        torch.testing.assert_close(run(PeftModel.from_pretrained(make_model("mlp"), f"{tmp}/topk"), inputs), expected,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("base_model.model.lin0.vblora_logits_A_topk_weights"), "no matching '_topk_weights'"),
    (lambda sd: sd.pop("base_model.model.lin0.vblora_logits_A_topk_indices"), "no matching '_topk_indices'"),
    (lambda sd: sd.__setitem__("base_model.model.lin0.vblora_logits_A_topk_indices",
                               torch.full((3, 5, 2), 9, dtype=torch.uint8)), r"must be in \[0, 8\)"),
    (lambda sd: sd.__setitem__("base_model.model.lin0.vblora_logits_A_topk_weights", torch.ones(3, 5, 3)),
     "do not fit indices"),
])
def test_broken_top_k_checkpoints_are_refused_by_name(change, message):
    model = get_peft_model(make_model("mlp"), _config(save_only_topk_weights=True))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        state = load_file(f"{tmp}/adapter_model.safetensors")
        change(state)
        save_file(state, f"{tmp}/adapter_model.safetensors")
        with pytest.raises(CheckpointError, match=message):
            PeftModel.from_pretrained(make_model("mlp"), tmp)


def test_mixed_batch_matches_hf_single_runs():
    check_mixed_batch_against_hf("mlp", lambda: _hf_config(target_modules=["lin0", "lin1"]))
    check_mixed_batch_against_hf("llama", lambda: peft.VBLoRAConfig(target_modules=["q_proj", "v_proj"], r=2,
                                                                     num_vectors=6, vector_length=4, topk=3))


@pytest.mark.parametrize("strategy", ["bmm", "concat", "grouped", "auto"])
def test_mixed_batches_use_the_stacked_kernels(strategy, monkeypatch):
    """No group-by-adapter loop: the generic path is never taken; rows equal single runs, also with
    adapters of different rank, bank size and vector length on one layer."""
    monkeypatch.setattr(mixed, "strategy", strategy)
    model = get_peft_model(make_model("llama"), VBLoRAConfig(target_modules=["q_proj", "v_proj"], r=3, num_vectors=8,
                                                             vector_length=4), adapter_name="first")
    model.add_adapter("second", VBLoRAConfig(target_modules=["q_proj"], r=2, num_vectors=5, vector_length=2, topk=3))
    model.set_adapter(["first", "second"])
    perturb(model, 1)
    model.eval()
    inputs = make_inputs("llama")
    singles = {}
    for name in ("first", "second"):
        model.set_adapter(name)
        singles[name] = run(model, inputs)
    with model.disable_adapter():
        singles["__base__"] = run(model, inputs)
    names = ["second", "__base__", "first", "second"][: inputs["input_ids"].shape[0]]

    def no_loop(*args, **kwargs):
        raise AssertionError("the generic per-adapter loop ran")

    monkeypatch.setattr(AdapterLayer, "mixed_forward", no_loop)
    got = run(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(got[row], singles[name][row], rtol=0, atol=1e-5)


def test_composed_factors_are_cached_until_the_logits_or_the_bank_change():
    model = get_peft_model(make_model("mlp"), _config()).eval()
    lin0, lin1 = model.base_model.model.lin0, model.base_model.model.lin1
    with torch.no_grad():
        a1, b1, scale = lin0.low_rank_factors("default")
        assert scale == 1.0 and lin0.low_rank_factors("default")[0] is a1  # the stacks see one tensor
        torch.testing.assert_close(b1 @ a1, lin0.delta_weight("default"))
        other = lin1.low_rank_factors("default")[0]
        lin0.vblora_vector_bank["default"].mul_(2)  # an optimizer step on the shared bank
        a2 = lin0.low_rank_factors("default")[0]
        assert a2 is not a1 and lin1.low_rank_factors("default")[0] is not other
        torch.testing.assert_close(a2, 2 * a1)
        lin0.vblora_logits_B["default"].add_(1)  # softmax is shift-invariant: a new tensor, same values
        assert lin0.low_rank_factors("default")[1] is not b1
    assert lin0.low_rank_factors("nope") is None
    lin0.delete_adapter("default")
    assert len(lin0._factors) == 0


def test_mixed_batch_sees_a_changed_bank():
    model = get_peft_model(make_model("mlp"), _config(), adapter_name="a")
    model.add_adapter("b", _config())
    model.eval()
    inputs = make_inputs("mlp")
    run(model, inputs, adapter_names=["a", "b", "a", "b"])
    with torch.no_grad():
        model.base_model.model.lin0.vblora_vector_bank["b"].mul_(3)
    got = run(model, inputs, adapter_names=["a", "b", "a", "b"])
    model.set_adapter("b")
    torch.testing.assert_close(got[1], run(model, inputs)[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind, targets", [("mlp", ["lin0", "lin1"]), ("gpt2-conv1d", ["c_fc", "c_proj"])])
def test_two_active_adapters_compose_as_hf(kind, targets):
    kwargs = dict(target_modules=targets, r=2, num_vectors=6, vector_length=2)
    check_active_adapters_against_hf(kind, lambda: peft.VBLoRAConfig(**kwargs), lambda: VBLoRAConfig(**kwargs))


def test_merge_matches_hf_merge_and_safe_merge_refuses_non_finite():
    inputs = make_inputs("gpt2-conv1d")
    kwargs = dict(target_modules=["c_fc", "c_proj"], r=2, num_vectors=6, vector_length=2, fan_in_fan_out=True)
    with tempfile.TemporaryDirectory() as tmp:
        with hf_oracle("HF peft merging a VB-LoRA adapter"):
            hf = peft.get_peft_model(make_model("gpt2-conv1d"), peft.VBLoRAConfig(**kwargs))
            perturb(hf, 2)
            hf.save_pretrained(tmp)
            hf_merged = hf.merge_and_unload()
        ours = PeftModel.from_pretrained(make_model("gpt2-conv1d"), tmp)
        broken = PeftModel.from_pretrained(make_model("gpt2-conv1d"), tmp)
    merged = ours.merge_and_unload(safe_merge=True)
    for name in ("c_fc", "c_proj"):
        torch.testing.assert_close(getattr(merged, name).weight, getattr(hf_merged, name).weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(merged, inputs), run(hf_merged, inputs), rtol=0, atol=1e-5)
    layer = broken.base_model.model.c_fc
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.vblora_vector_bank["default"][0] = float("nan")
        layer.vblora_logits_A["default"][..., 0] = 1e4  # every A sub-vector picks the NaN vector
    with pytest.raises(ValueError, match="NaNs or infs detected"):
        broken.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)


def test_dropout_drops_inputs_in_training_only():
    torch.manual_seed(0)
    model = get_peft_model(make_model("mlp"), _config(target_modules=["lin0"], vblora_dropout=0.5))
    layer = model.base_model.model.lin0
    x = torch.zeros(1, layer.in_features)
    x[0, 2] = 1
    with torch.no_grad():
        model.eval()
        full = layer(x) - layer.base_layer(x)
        assert layer.low_rank_factors("default") is not None
        model.train()
        assert layer.low_rank_factors("default") is None
        ratios = {round(((layer(x) - layer.base_layer(x)) / full).mean().item(), 3) for _ in range(40)}
    assert ratios == {0.0, 2.0}  # inverted dropout of the input, as HF


@pytest.mark.parametrize("autocast, dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_adapter_dtypes_on_a_bf16_base_are_hfs(autocast, dtype):
    config = dict(target_modules=["lin1"], r=2, num_vectors=8, vector_length=4, save_only_topk_weights=True)
    ours = get_peft_model(make_model("mlp").to(torch.bfloat16), VBLoRAConfig(**config), autocast_adapter_dtype=autocast)
    with hf_oracle("HF peft building a VB-LoRA adapter on a bf16 model"):
        hf = peft.get_peft_model(make_model("mlp").to(torch.bfloat16), peft.VBLoRAConfig(**config),
                                 autocast_adapter_dtype=autocast)
    types = lambda m: {n: p.dtype for n, p in m.named_parameters() if "vblora" in n}  # noqa: E731
    assert types(ours) == types(hf) and set(types(ours).values()) == {dtype}
    assert ({k: v.dtype for k, v in get_peft_model_state_dict(ours).items()}
            == {k: v.dtype for k, v in peft.get_peft_model_state_dict(hf).items()})
    assert run(ours, {"x": make_inputs("mlp")["x"].to(torch.bfloat16)}).dtype == torch.bfloat16


def test_adapters_with_their_own_banks_and_deletion():
    model = get_peft_model(make_model("mlp"), _config(target_modules=["lin1"], vector_length=4))
    model.add_adapter("b", _config(target_modules=["lin1", "lin2"], num_vectors=5))
    lin1 = model.base_model.model.lin1
    assert lin1.vblora_vector_bank["default"].shape == (8, 4) and lin1.vblora_vector_bank["b"].shape == (5, 2)
    assert lin1.vblora_vector_bank["b"] is model.base_model.model.lin2.vblora_vector_bank["b"]
    model.delete_adapter("b")
    assert [n for n, _ in model.named_parameters() if "vblora" in n] == [
        "base_model.model.lin1.vblora_logits_A.default", "base_model.model.lin1.vblora_logits_B.default",
        "base_model.model.lin1.vblora_vector_bank.default"]


def test_vector_length_must_divide_every_target_and_a_refused_adapter_leaves_nothing():
    with pytest.raises(ConfigError, match=r"vector_length \(3\).*'lin0' has in_features=10"):
        get_peft_model(make_model("mlp"), _config(vector_length=3))
    model = get_peft_model(make_model("mlp"), _config())
    before = set(model.state_dict())
    with pytest.raises(ConfigError, match=r"vector_length \(32\).*'lin1' has in_features=16"):
        model.add_adapter("c", _config(target_modules=["lin1"], vector_length=32))
    assert set(model.state_dict()) == before and "c" not in model.peft_config  # HF leaves vblora_vector_bank.c


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), r"\$\.r must be an integer from 1"),
    (dict(topk=0), r"\$\.topk must be an integer from 1 to 8"),
    (dict(topk=9), r"\$\.topk must be an integer from 1 to 8, got 9 \(topk picks among num_vectors"),
    (dict(num_vectors=0), r"\$\.num_vectors must be an integer from 1"),
    (dict(num_vectors=1 << 20), r"\$\.num_vectors must be an integer from 1 to 65,536"),
    (dict(vector_length=0), r"\$\.vector_length must be an integer from 1"),
    (dict(vblora_dropout=1.5), "vblora_dropout must be in"),
    (dict(init_logits_std=-1.0), "init_logits_std must be a finite number >= 0"),
    (dict(init_vector_bank_bound=float("nan")), "init_vector_bank_bound.*NaN"),
    (dict(init_vector_bank_bound=-0.1), "init_vector_bank_bound must be a finite number >= 0"),
    (dict(bias="foo"), "bias"),
    (dict(vblora_rank=2), "vblora_rank"),
])
def test_bad_configs_raise_named_errors(kwargs, message):
    with pytest.raises((ConfigError, TypeError), match=message):
        _config(**kwargs)


def test_config_fields_and_defaults_are_hfs():
    hf_fields = {f.name: f.default for f in dataclasses.fields(peft.VBLoRAConfig)}
    ours = VBLoRAConfig()
    for name in ("r", "num_vectors", "vector_length", "topk", "save_only_topk_weights", "vblora_dropout",
                 "fan_in_fan_out", "bias", "init_vector_bank_bound", "init_logits_std"):
        assert getattr(ours, name) == hf_fields[name], name


def test_embedding_is_refused_by_name():
    with pytest.raises(TargetNotFoundError, match="'emb' of type Embedding"):
        get_peft_model(make_model("embedding"), VBLoRAConfig(target_modules=["emb"], vector_length=2, num_vectors=4))


@pytest.mark.parametrize("kind", ["opt", "t5", "llama"])
def test_default_targets_are_hfs(kind):
    config = dict(r=2, num_vectors=4, vector_length=8)
    targets = lambda m: sorted(n for n, mod in m.named_modules() if hasattr(mod, "vblora_logits_A"))  # noqa: E731
    with hf_oracle("HF peft choosing VB-LoRA's default targets"):
        hf = peft.get_peft_model(make_model(kind), peft.VBLoRAConfig(**config))
    assert targets(get_peft_model(make_model(kind), VBLoRAConfig(**config))) == targets(hf)


def test_layer_status_is_hfs():
    ours = get_peft_model(make_model("gpt2-conv1d"), VBLoRAConfig(target_modules=["c_fc"], vector_length=2, num_vectors=4))
    assert ours.get_layer_status()[0].module_type == "vblora.Linear"


def test_inference_mode_then_autograd():
    """Factors composed under ``torch.inference_mode()`` are normal tensors: mixed batches work
    there, and a later forward with autograd (input gradients, frozen adapters) can use them."""
    model = get_peft_model(make_model("mlp"), _config(), adapter_name="a")
    model.add_adapter("b", _config())
    model.eval()
    x = make_inputs("mlp")["x"]
    with torch.inference_mode():
        single = model(x=x)
        mixed_rows = model(x=x, adapter_names=["a", "b", "a", "b"])
    for p in model.parameters():
        p.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    out = model(x=xg)
    out.sum().backward()
    assert xg.grad is not None
    torch.testing.assert_close(out.detach(), single, rtol=0, atol=0)
    torch.testing.assert_close(run(model, {"x": x}, adapter_names=["a", "b", "a", "b"]), mixed_rows, rtol=0, atol=0)
    xg.grad = None
    model(x=xg, adapter_names=["a", "b", "a", "b"]).sum().backward()  # the stack built in inference mode
    assert xg.grad is not None


@pytest.mark.parametrize("kwargs", [dict(), dict(modules_to_save=["lin2"]), dict(bias="all"),
                                    dict(save_only_topk_weights=True, num_vectors=300),
                                    dict(save_only_topk_weights=True, num_vectors=40000, topk=3),
                                    dict(save_only_topk_weights=True, modules_to_save=["lin2"])])
def test_savable_parameter_counts_are_hfs(kwargs, capsys):
    """``VBLoRAModel.get_nb_savable_parameters`` / ``print_savable_parameters`` (HF's tuner API,
    also reached from the ``PeftModel``): top-k indices count by their size in float32 values."""
    config = {"target_modules": ["lin0", "lin1"], "r": 2, "num_vectors": 8, "vector_length": 2, **kwargs}
    ours = get_peft_model(make_model("mlp"), VBLoRAConfig(**config))
    with hf_oracle("HF peft counting a VB-LoRA adapter's savable parameters"):
        hf = peft.get_peft_model(make_model("mlp"), peft.VBLoRAConfig(**config))
        expected = hf.base_model.get_nb_savable_parameters()
        hf.print_savable_parameters()
    printed = capsys.readouterr().out
    assert ours.base_model.get_nb_savable_parameters() == expected
    ours.print_savable_parameters()
    assert capsys.readouterr().out == printed


def test_savable_parameters_count_the_asked_adapter():
    """HF counts every adapter's VB-LoRA tensors whichever is asked for (704 for both here): ours
    counts the adapter's own, as saved."""
    model = get_peft_model(make_model("mlp"), _config(target_modules=["lin0"], r=2))
    model.add_adapter("b", _config(target_modules=["lin0", "lin1"], r=2))
    assert model.base_model.get_nb_savable_parameters() == (80 + 128 + 16, 0)
    assert model.base_model.get_nb_savable_parameters("b") == (80 + 128 + 128 + 128 + 16, 0)
