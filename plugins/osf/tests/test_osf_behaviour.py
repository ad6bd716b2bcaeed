"""OSF against HF peft (the oracle) and against its own definition: the SVD split, the preserved
rank rules, training with projected gradients, merging, mixed batches, dtypes and bad configs."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from peft_kernel import ConfigError, PeftModel, get_peft_model, save_as_lora
from peft_kernel.plugin_api import UnsupportedFeatureError
from peft_kernel_testing import check_mixed_batch_against_hf, make_inputs, make_model, perturb, run
from peft_kernel_testing.hf_oracle import hf_oracle
from peft_kernel_lowrank import mixed
from peft_kernel_osf import OSFConfig
from peft_kernel_osf.layers import OSFLinear

peft = pytest.importorskip("peft")

ALL = ["lin0", "lin1", "lin2"]  # 10 -> 16 (U not square), 16 -> 16, 16 -> 4 (V not square)
LLAMA = ["q_proj", "v_proj", "down_proj"]


def _pair(kind="mlp", **kwargs):
    """Ours and HF's model from the same base weights and the same random state."""
    kwargs.setdefault("target_modules", ALL if kind == "mlp" else LLAMA)
    ours = get_peft_model(make_model(kind), OSFConfig(**kwargs))
    with hf_oracle("HF peft building an OSF adapter"):
        theirs = peft.get_peft_model(make_model(kind), peft.OSFConfig(**kwargs))
    return ours, theirs


def _layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "osf_svd_params")}


def _tensors(model, buffers=False):
    items = model.named_buffers() if buffers else model.named_parameters()
    return {n: t.detach() for n, t in items if "osf" in n}


# ---- the split --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, kwargs", [("mlp", {}), ("mlp", {"init_weights": False, "effective_rank": 3}),
                                          ("llama", {"effective_rank": 0.25}),
                                          ("mlp", {"rank_pattern": {"lin[01]": 2, "lin0": 1}})])
def test_svd_factors_and_buffers_equal_hf_bit_for_bit(kind, kwargs):
    """Trainable factors and frozen buffers (HF PEFT's names) are HF's exactly, random init included."""
    ours, theirs = _pair(kind, **kwargs)
    for buffers in (False, True):
        got, expected = _tensors(ours, buffers), _tensors(theirs, buffers)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got), [k for k in got if not torch.equal(got[k], expected[k])]
    assert {n: m.effective_rank for n, m in _layers(ours).items()} == {n: m.effective_rank for n, m in _layers(theirs).items()}


def test_split_reconstructs_the_weight_and_starts_as_the_base():
    torch.manual_seed(0)
    base = torch.nn.Linear(9, 6).double()
    layer = OSFLinear(base)
    layer.update_layer("a", OSFConfig(effective_rank=2), "lin")
    p = layer.osf_svd_params["a"]
    u, s, vh = torch.linalg.svd(base.weight.detach().float(), full_matrices=False)
    high = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(high.double() + (p["U_low"] * p["S_low"]) @ p["V_low"], base.weight, atol=1e-6, rtol=0)
    assert p["S_low"].shape == (4,) and "a" in layer._osf_V_high and "a" not in layer._osf_U_high
    assert layer.delta_weight("a").abs().max() < 1e-12  # the initial factors cancel


# ---- the preserved rank -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {}, {"effective_rank": 2}, {"effective_rank": 0.8}, {"effective_rank": 1.0}, {"effective_rank": 2.0},
    {"effective_rank": 100}, {"rank_pattern": {"in0": 1}}, {"rank_pattern": {".*": 3}, "effective_rank": 0.5},
    {"rank_pattern": {"lin[12]": 0.5, "lin2": 1}, "effective_rank": 5},
    {"kind": "llama", "rank_pattern": {"layers.0.self_attn.q_proj": 1, "down": 0.75}, "effective_rank": 3},
])
def test_preserved_ranks_equal_hf(kwargs):
    """None = half the smaller dimension, a float in (0, 1] a fraction of it (rounded down), larger
    values are capped; ``rank_pattern`` keys are searched anywhere in the name, first match wins."""
    ours, theirs = _pair(**kwargs)
    got = {n: (m.effective_rank, tuple(m.osf_svd_params["default"]["S_low"].shape)) for n, m in _layers(ours).items()}
    assert got == {n: (m.effective_rank, tuple(m.osf_svd_params["default"]["S_low"].shape)) for n, m in _layers(theirs).items()}
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_nothing_left_to_train_is_the_base_model():
    """effective_rank >= min(shape) preserves everything: no trainable parameter (as HF), base output,
    and such an adapter still serves mixed batches next to another one."""
    ours, theirs = _pair(effective_rank=100)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters() == (0, 516)
    inputs = make_inputs("mlp")
    torch.testing.assert_close(run(ours, inputs), run(make_model("mlp"), inputs), atol=1e-6, rtol=0)
    ours.add_adapter("some", OSFConfig(target_modules=ALL))
    ours.set_adapter("some")
    perturb(ours, 1)
    ours.eval()
    some = run(ours, inputs)
    mixed_out = run(ours, inputs, adapter_names=["default", "some", "__base__", "some"])
    torch.testing.assert_close(mixed_out[[1, 3]], some[[1, 3]], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed_out[[0, 2]], run(make_model("mlp"), inputs)[[0, 2]], atol=1e-5, rtol=0)


# ---- training -----------------------------------------------------------------------------------
def _adamw(params):
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


def _sgd(params):
    """Orthogonality holds for optimizers whose step is linear in the gradients (SGD, momentum):
    the projection acts on gradients, and Adam's per-coordinate scaling leaves the subspace."""
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def _train(model, kind, steps=4, optimizer=_adamw):
    optimizer = optimizer([p for p in model.parameters() if p.requires_grad])
    inputs = make_inputs(kind)
    grads = []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(**inputs)
        (out if isinstance(out, torch.Tensor) else out.logits).float().sin().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
    return grads


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_adamw_training_equals_hf(kind):
    """Same base, data and steps: every gradient (projected U_low / V_low, plain S_low) and every
    parameter after AdamW equal HF PEFT's."""
    ours, theirs = _pair(kind)
    got = _train(ours, kind)
    with hf_oracle("HF peft training an OSF adapter"):
        expected = _train(theirs, kind)
    for step, (g, e) in enumerate(zip(got, expected)):
        assert g.keys() == e.keys()
        for name in g:
            torch.testing.assert_close(g[name], e[name], atol=1e-6, rtol=0, msg=f"grad {name} step {step}")
    ours_p, theirs_p = _tensors(ours), _tensors(theirs)
    for name in ours_p:
        torch.testing.assert_close(ours_p[name], theirs_p[name], atol=1e-5, rtol=0, msg=name)


def _low_factors(model):
    return {n: {k: p.detach().clone() for k, p in m.osf_svd_params["default"].items()} for n, m in _layers(model).items()}


def _updates_leave_high_subspace_alone(model, start):
    """Training moved ``U_low`` / ``V_low`` (from ``start``) only orthogonally to the preserved
    subspace of each base weight."""
    for name, layer in _layers(model).items():
        k = layer.effective_rank["default"]
        u, _, vh = torch.linalg.svd(layer.base_layer.weight.detach(), full_matrices=False)
        p = layer.osf_svd_params["default"]
        du = p["U_low"].detach() - start[name]["U_low"]
        dv = p["V_low"].detach() - start[name]["V_low"]
        assert du.abs().max() > 1e-3 and dv.abs().max() > 1e-3, f"{name} did not train"
        assert (u[:, :k].T @ du).abs().max() < 1e-5, f"{name}: U_low moved into the preserved subspace"
        assert (dv @ vh[:k].T).abs().max() < 1e-5, f"{name}: V_low moved into the preserved subspace"


def test_updates_are_orthogonal_to_the_preserved_subspace():
    model = get_peft_model(make_model("mlp"), OSFConfig(target_modules=ALL))
    start = _low_factors(model)
    _train(model, "mlp", steps=3, optimizer=_sgd)
    _updates_leave_high_subspace_alone(model, start)


def test_projection_survives_deepcopy():
    """HF PEFT hooks the parameters, and ``copy.deepcopy`` drops tensor hooks; ours hooks what each
    forward uses, so a copied model still trains orthogonally."""
    model = copy.deepcopy(get_peft_model(make_model("mlp"), OSFConfig(target_modules=ALL)))
    start = _low_factors(model)
    _train(model, "mlp", steps=3, optimizer=_sgd)
    _updates_leave_high_subspace_alone(model, start)


# ---- merging --------------------------------------------------------------------------------------
def test_unmerge_restores_the_base_where_hf_refuses():
    ours, theirs = _pair()
    perturb(ours, 0)
    ours.eval()
    inputs = make_inputs("mlp")
    expected, base = run(ours, inputs), run(make_model("mlp"), inputs)
    weights = {n: m.base_layer.weight.detach().clone() for n, m in _layers(ours).items()}
    ours.merge_adapter(safe_merge=True)
    torch.testing.assert_close(run(ours, inputs), expected, atol=1e-5, rtol=0)
    with ours.disable_adapter():  # unmerges: the base model (HF PEFT cannot unmerge OSF)
        torch.testing.assert_close(run(ours, inputs), base, atol=1e-5, rtol=0)
    ours.merge_adapter()
    ours.unmerge_adapter()
    for name, layer in _layers(ours).items():
        torch.testing.assert_close(layer.base_layer.weight, weights[name], atol=1e-6, rtol=0)
    perturb(theirs, 0)
    ours.merge_adapter()
    theirs.merge_adapter()
    for name, layer in _layers(theirs).items():  # the same merged weights
        torch.testing.assert_close(_layers(ours)[name].base_layer.weight, layer.base_layer.weight, atol=1e-6, rtol=0)
    with pytest.raises(NotImplementedError):
        theirs.unmerge_adapter()


def test_safe_merge_refuses_non_finite():
    model = get_peft_model(make_model("mlp"), OSFConfig(target_modules=["lin0"]))
    with torch.no_grad():
        model.base_model.model.lin0.osf_svd_params["default"]["S_low"][0] = float("inf")
    before = model.base_model.model.lin0.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, before)


# ---- several adapters -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_mixed_batch_rows_equal_hf_single_runs(kind):
    targets = ALL if kind == "mlp" else LLAMA
    check_mixed_batch_against_hf(kind, lambda: peft.OSFConfig(target_modules=targets, effective_rank=0.25))


def test_mixed_batch_is_vectorised(monkeypatch):
    """Adapters of different ranks in one batch go through the stacked kernels: no per-adapter delta."""
    model = get_peft_model(make_model("mlp"), OSFConfig(target_modules=ALL, effective_rank=2), adapter_name="a")
    model.add_adapter("b", OSFConfig(target_modules=ALL, effective_rank=0.75))
    perturb(model, 0)
    model.set_adapter("b")
    perturb(model, 1)
    model.eval()
    inputs = make_inputs("mlp")
    singles = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        singles[name] = run(model, inputs)

    def refuse(self, x, name):
        raise AssertionError("a per-adapter delta ran in a mixed batch")

    monkeypatch.setattr(OSFLinear, "delta", refuse)
    names = ["b", "a", "b", "a"]
    got = run(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(got[row], singles[name][row], atol=1e-5, rtol=0)
    assert all(mixed.get_stack(layer) is layer.__dict__["_low_rank_stack"] for layer in _layers(model).values())


def test_two_active_adapters_add_their_updates():
    """Both updates apply (W + delta_a + delta_b). HF PEFT 0.21.2 silently applies only the first
    active adapter; the reference here is the formula."""
    model = get_peft_model(make_model("mlp"), OSFConfig(target_modules=ALL), adapter_name="a")
    model.add_adapter("b", OSFConfig(target_modules=ALL, effective_rank=3))
    perturb(model, 0)
    model.set_adapter("b")
    perturb(model, 1)
    model.base_model.set_adapter(["a", "b"])
    model.eval()
    reference = make_model("mlp")
    with torch.no_grad():
        for name, layer in _layers(model).items():
            getattr(reference, name).weight += layer.delta_weight("a") + layer.delta_weight("b")
    inputs = make_inputs("mlp")
    torch.testing.assert_close(run(model, inputs), run(reference, inputs), atol=1e-5, rtol=0)


# ---- formats, dtypes, tasks ---------------------------------------------------------------------------
def test_saved_keys_and_config_equal_hf(tmp_path):
    ours, theirs = _pair(effective_rank=0.5, rank_pattern={"lin1": 3})
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "hf")
    got, expected = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "hf"))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    assert "base_model.model.lin0.osf_svd_params.U_low" in got
    skip = {"peft_version", "auto_mapping"}
    ours_json, hf_json = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "hf"))
    assert {k: v for k, v in ours_json.items() if k not in skip} == {k: v for k, v in hf_json.items() if k not in skip}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base_equals_hf_bit_for_bit(dtype, autocast):
    """On a half-precision base the SVD runs in float32 and is rounded to the base dtype; with
    ``autocast_adapter_dtype`` the adapter is then upcast to float32 and each delta rounded to the
    base dtype before it is added. Factors, buffers and outputs are HF PEFT's exactly."""
    inputs = {"x": make_inputs("mlp")["x"].to(dtype)}
    ours = get_peft_model(make_model("mlp").to(dtype), OSFConfig(target_modules=ALL), autocast_adapter_dtype=autocast)
    with hf_oracle("HF peft running an OSF adapter on a half-precision base"):
        theirs = peft.get_peft_model(make_model("mlp").to(dtype), peft.OSFConfig(target_modules=ALL),
                                     autocast_adapter_dtype=autocast)
        perturb(theirs, 0)
        expected = run(theirs.eval(), inputs)
    perturb(ours, 0)
    for buffers in (False, True):
        got, hf_tensors = _tensors(ours, buffers), _tensors(theirs, buffers)
        assert {t.dtype for t in got.values()} == {torch.float32 if autocast else dtype}
        assert all(torch.equal(got[k], hf_tensors[k]) for k in got)
    got = run(ours.eval(), inputs)
    assert got.dtype == dtype and torch.equal(got, expected)


def test_from_pretrained_rebuilds_the_frozen_part_from_the_base(tmp_path):
    """The buffers are not saved: a load recomputes them from the base weight it is given."""
    model = get_peft_model(make_model("mlp"), OSFConfig(target_modules=ALL))
    perturb(model, 0)
    model.save_pretrained(tmp_path)
    assert not [k for k in load_file(tmp_path / "adapter_model.safetensors") if "_osf_" in k]
    loaded = PeftModel.from_pretrained(make_model("mlp"), tmp_path, is_trainable=True)
    for buffers in (False, True):
        got, expected = _tensors(loaded, buffers), _tensors(model, buffers)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    start = _low_factors(loaded)
    _train(loaded, "mlp", steps=2, optimizer=_sgd)
    _updates_leave_high_subspace_alone(loaded, start)


# ---- targets and bad configs -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "bert", "opt", "t5", "mlp"])
def test_default_targets_are_every_linear_layer_as_hf(kind):
    kwargs = {"task_type": "SEQ_CLS"} if kind == "bert" else {}
    ours = get_peft_model(make_model(kind), OSFConfig(**kwargs))
    with hf_oracle("HF peft choosing OSF's default targets"):
        theirs = peft.get_peft_model(make_model(kind), peft.OSFConfig(**kwargs))
    assert set(_layers(ours)) == set(_layers(theirs)) and _layers(ours)


@pytest.mark.parametrize("kind, kwargs", [("gpt2", {}), ("gpt2-conv1d", {"target_modules": ["c_fc"]}),
                                          ("conv2d", {"target_modules": ["conv0", "lin"]}),
                                          ("embedding", {"target_modules": ["emb"]})])
def test_layers_hf_skips_silently_are_refused_by_name(kind, kwargs):
    """HF PEFT leaves Conv1D / Conv2d / Embedding targets unadapted without a word (GPT-2: zero
    trainable parameters); ours refuses them, naming the module and its type."""
    with pytest.raises(UnsupportedFeatureError, match="supports nn.Linear layers only"):
        get_peft_model(make_model(kind), OSFConfig(**kwargs))
    with hf_oracle("HF peft skipping non-linear OSF targets"):
        theirs = peft.get_peft_model(make_model(kind), peft.OSFConfig(**kwargs))
    assert not [n for n in _layers(theirs) if n.endswith(("c_fc", "c_attn", "conv0", "emb"))]


@pytest.mark.parametrize("kwargs, field", [
    ({"effective_rank": 0}, "effective_rank"), ({"effective_rank": -2}, "effective_rank"),
    ({"effective_rank": 0.0}, "effective_rank"), ({"effective_rank": 1.5}, "effective_rank"),
    ({"effective_rank": True}, "effective_rank"), ({"effective_rank": "3"}, "effective_rank"),
    ({"rank_pattern": {"lin0": 0}}, "rank_pattern"), ({"rank_pattern": {"lin(": 2}}, "rank_pattern"),
    ({"init_weights": "no"}, "init_weights"), ({"target_svd_config": {"lin0": "x"}}, "target_svd_config"),
    ({"target_modules": 3}, "target_modules"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        OSFConfig(**kwargs)


@pytest.mark.parametrize("field", ["exclude_modules", "layers_to_transform", "layers_pattern", "r"])
def test_fields_hf_osf_lacks_are_refused(field):
    with pytest.raises(TypeError, match=field):
        OSFConfig(**{field: ["x"]})


def test_a_fraction_leaving_nothing_preserved_names_the_module():
    """0.1 of lin2's smaller dimension (4) is 0 preserved directions: refused before anything changes."""
    model = make_model("mlp")
    with pytest.raises(ConfigError, match="'lin2'.*at least 1"):
        get_peft_model(model, OSFConfig(target_modules=ALL, effective_rank=0.1))
    assert not _layers(model)


def test_converts_to_lora_where_hf_refuses(tmp_path):
    """OSF is additive (``W + B A``), so ``save_as_lora`` at the update's full rank (lin0: 10) reproduces it;
    HF PEFT 0.21.2's ``convert_to_lora`` refuses OSF layers."""
    model = get_peft_model(make_model("mlp"), OSFConfig(target_modules=["lin0"]))
    perturb(model, 0)
    model.eval()

    save_as_lora(tmp_path, model, rank=10)
    lora = PeftModel.from_pretrained(make_model("mlp"), tmp_path)
    inputs = make_inputs("mlp")
    torch.testing.assert_close(run(lora, inputs), run(model, inputs), atol=1e-5, rtol=0)
    with hf_oracle("HF peft building an OSF adapter"):
        theirs = peft.get_peft_model(make_model("mlp"), peft.OSFConfig(target_modules=["lin0"]))
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        peft.convert_to_lora(theirs, 4)
