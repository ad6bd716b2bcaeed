"""``PeftMixedModel`` / ``get_peft_model(..., mixed=True)``: LoRA, LoHa, LoKr and OFT adapters on one
model, stacked on shared layers, several active at once — against HF PEFT's ``PeftMixedModel``
loading the same single-method checkpoints; plus what HF PEFT lacks: saving a mixed model (one
HF-format sub-folder per adapter and a manifest) and mixed batches across methods."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import peft_kernel as pk
from peft_kernel_testing import make_inputs, make_model
from peft_kernel_testing.hf_oracle import hf_oracle, perturb

peft = pytest.importorskip("peft")

ORDER = ["a", "b", "c", "o"]


def _hf_configs():
    return {
        "a": peft.LoraConfig(target_modules=["lin0", "lin1"], r=4),
        "b": peft.LoHaConfig(target_modules=["lin0", "lin1"], r=4, init_weights=False),
        "c": peft.LoKrConfig(target_modules=["lin1", "lin2"], r=4, init_weights=False),
        "o": peft.OFTConfig(target_modules=["lin1"], r=2, oft_block_size=0, init_weights=False),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One HF PEFT checkpoint per method, all on the same MLP (lin1 gets all four methods)."""
    folder = tmp_path_factory.mktemp("single")
    with hf_oracle():
        for i, (name, config) in enumerate(_hf_configs().items()):
            model = peft.get_peft_model(make_model("mlp"), config)
            perturb(model, seed=i)
            model.save_pretrained(folder / name)
    return folder


def _load(lib, saved, names=ORDER, kind="mlp"):
    model = lib.PeftMixedModel.from_pretrained(make_model(kind), saved / names[0], names[0])
    for name in names[1:]:
        model.load_adapter(saved / name, name)
    return model


ACTIVE = [["a"], ["b"], ["c"], ["o"], ["a", "b"], ["b", "c"], ["a", "b", "c"], ["a", "b", "c", "o"], ["o", "a"]]


def test_loaded_adapters_equal_hf_mixed_model(saved):
    inputs = make_inputs("mlp")
    ours = _load(pk, saved)
    assert type(ours).__name__ == "PeftMixedModel" and type(ours.base_model).__name__ == "MixedModel"
    with hf_oracle():
        hf = _load(peft, saved)
    for active in ACTIVE:
        ours.set_adapter(active)
        with hf_oracle():
            hf.set_adapter(active)
            expected = hf(**inputs)
        torch.testing.assert_close(ours(**inputs), expected, rtol=0, atol=1e-6, msg=str(active))
    # layers stack as in HF PEFT: lin1 = OFT(LoKr(LoHa(LoRA(Linear))))
    chain, layer = [], ours.base_model.model.lin1
    while hasattr(layer, "base_layer"):
        chain.append(layer.peft_type)
        layer = layer.base_layer
    assert chain == ["OFT", "LOKR", "LOHA", "LORA"]
    with pytest.raises(ValueError, match="not found"):
        ours.set_adapter(["a", "zzz"])


def test_disable_merge_unload(saved):
    inputs = make_inputs("mlp")
    base = make_model("mlp")(**inputs)
    ours = _load(pk, saved)
    ours.set_adapter(["a", "b", "c", "o"])
    adapted = ours(**inputs)
    with ours.disable_adapter():
        torch.testing.assert_close(ours(**inputs), base)
    torch.testing.assert_close(ours(**inputs), adapted)
    ours.merge_adapter()
    torch.testing.assert_close(ours(**inputs), adapted, rtol=0, atol=1e-5)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours(**inputs), adapted, rtol=0, atol=1e-5)
    merged = ours.merge_and_unload()
    assert not any(hasattr(m, "base_layer") for m in merged.modules())
    torch.testing.assert_close(merged(**inputs), adapted, rtol=0, atol=1e-5)
    unloaded = _load(pk, saved).unload()
    assert not any(hasattr(m, "base_layer") for m in unloaded.modules())
    torch.testing.assert_close(unloaded(**inputs), base)


def test_get_peft_model_mixed_add_delete_and_trainability():
    model = pk.get_peft_model(make_model("mlp"), pk.LoraConfig(target_modules=["lin0", "lin1"], r=4), mixed=True)
    assert isinstance(model, pk.PeftMixedModel)
    model.add_adapter("b", pk.LoHaConfig(target_modules=["lin1"], r=2))
    model.add_adapter("a2", pk.LoraConfig(target_modules=["lin1"], r=2))  # joins the LoRA layer under LoHa
    lin1 = model.base_model.model.lin1
    assert lin1.peft_type == "LOHA" and lin1.base_layer.peft_type == "LORA"
    assert sorted(lin1.base_layer.adapter_names()) == ["a2", "default"]
    model.set_adapter(["default", "b"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default" in n or ".b" in n for n in trainable)
    assert any(".b" in n for n in trainable) and any(".default" in n for n in trainable)
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("b", pk.LoKrConfig(target_modules=["lin1"]))
    model.delete_adapter(["b", "a2"])
    assert sorted(model.peft_config) == ["default"]
    with pytest.raises(ValueError, match="not compatible"):
        model.add_adapter("p", pk.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM", token_dim=16,
                                                     num_transformer_submodules=1, num_attention_heads=2,
                                                     num_layers=2))


def test_plain_models_still_refuse_mixing():
    model = pk.get_peft_model(make_model("mlp"), pk.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(pk.TargetNotFoundError, match="mixed=True"):
        pk.inject_adapter_in_model(pk.LoHaConfig(target_modules=["lin0"]), model.base_model.model, "x")


def test_save_pretrained_round_trip_and_hf_reads_each_subfolder(saved, tmp_path):
    inputs = make_inputs("mlp")
    ours = _load(pk, saved)
    ours.set_adapter(["a", "b", "o"])
    expected = ours(**inputs)
    ours.save_pretrained(tmp_path / "mixed")
    manifest = json.loads((tmp_path / "mixed" / "mixed_adapters.json").read_text())
    assert [a["name"] for a in manifest["adapters"]] == ORDER
    assert manifest["active_adapters"] == ["a", "b", "o"]
    back = pk.PeftMixedModel.from_pretrained(make_model("mlp"), tmp_path / "mixed")
    assert back.active_adapters == ["a", "b", "o"]
    torch.testing.assert_close(back(**inputs), expected, rtol=0, atol=0)
    # each sub-folder is an HF single-method checkpoint, bit-identical in tensors to the original
    from safetensors.torch import load_file

    for name in ORDER:
        mine = load_file(tmp_path / "mixed" / name / "adapter_model.safetensors")
        theirs = load_file(saved / name / "adapter_model.safetensors")
        assert sorted(mine) == sorted(theirs)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    with hf_oracle():
        hf = _load(peft, tmp_path / "mixed")
        hf.set_adapter(["a", "b", "o"])
        torch.testing.assert_close(hf(**inputs), expected, rtol=0, atol=1e-6)


def test_mixed_batches_across_methods(saved):
    """Beyond HF PEFT (its mixed model has no adapter_names): each row gets its own adapter, whatever
    its method, and equals a run with that adapter alone."""
    inputs = make_inputs("mlp")
    ours = _load(pk, saved).eval()
    rows = ["a", "b", "c", "__base__"]
    out = ours(**inputs, adapter_names=rows)
    for i, name in enumerate(rows):
        if name == "__base__":
            expected = make_model("mlp")(**inputs)
        else:
            ours.set_adapter(name)
            expected = ours(**inputs)
        torch.testing.assert_close(out[i], expected[i], rtol=0, atol=1e-6)


def test_convert_a_mixed_models_adapter_to_lora(saved):
    ours = _load(pk, saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config, state, errors = pk.convert_to_lora_with_errors(ours, 4, adapter_name="b")
    assert sorted(state) == sorted(f"base_model.model.{m}.lora_{x}.weight" for m in ("lin0", "lin1") for x in "AB")


def test_deleting_a_methods_last_adapter_or_a_failed_load_leaves_no_layer_behind(saved, tmp_path):
    import shutil

    inputs = make_inputs("mlp")
    ours = _load(pk, saved, ["a", "b"])
    ours.set_adapter(["a", "b"])
    expected = ours(**inputs)
    structure = repr(ours.base_model.model)
    bad = tmp_path / "bad"
    shutil.copytree(saved / "c", bad)
    from safetensors.torch import load_file, save_file

    tensors = load_file(bad / "adapter_model.safetensors")
    save_file({k: v[:1] for k, v in tensors.items()}, bad / "adapter_model.safetensors")  # wrong shapes
    with pytest.raises(pk.CheckpointError, match="do not fit"):
        ours.load_adapter(bad, "c")
    assert "c" not in ours.peft_config and repr(ours.base_model.model) == structure
    torch.testing.assert_close(ours(**inputs), expected, rtol=0, atol=0)
    ours.delete_adapter("b")
    assert all(getattr(m, "peft_type", "LORA") == "LORA" for m in ours.base_model.model.modules()
               if hasattr(m, "base_layer"))
    assert not hasattr(ours.base_model.model.lin1.base_layer, "base_layer")


def test_trainable_parameters_equal_hf():
    def build(lib):
        model = lib.get_peft_model(make_model("mlp"), lib.LoraConfig(target_modules=["lin0", "lin1"], r=4), mixed=True)
        model.add_adapter("b", lib.LoHaConfig(target_modules=["lin1"], r=2))
        model.add_adapter("c", lib.LoKrConfig(target_modules=["lin1", "lin2"], r=2))
        model.set_adapter(["default", "b"])
        return model.get_nb_trainable_parameters()

    with hf_oracle():
        expected = build(peft)
    assert build(pk) == expected


def test_lora_and_dora_stacked_over_loha_on_a_transformer_equal_hf(tmp_path):
    """LoRA (and DoRA) layers on top of LoHa/LoKr ones, in a tiny Llama; HF PEFT's numbers, and
    mixed batches through the whole chain."""
    configs = {
        "h": peft.LoHaConfig(target_modules=["q_proj", "v_proj"], r=2, init_weights=False),
        "k": peft.LoKrConfig(target_modules=["v_proj", "o_proj"], r=2, init_weights=False),
        "l": peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=2),
        "d": peft.LoraConfig(target_modules=["v_proj"], r=2, use_dora=True),
    }
    with hf_oracle():
        for i, (name, config) in enumerate(configs.items()):
            model = peft.get_peft_model(make_model("llama"), config)
            perturb(model, seed=10 + i)
            model.save_pretrained(tmp_path / name)
    names = list(configs)
    inputs = make_inputs("llama")
    ours = _load(pk, tmp_path, names, "llama").eval()
    with hf_oracle():
        hf = _load(peft, tmp_path, names, "llama").eval()
    for active in (names, ["l", "h"], ["d", "k"]):
        ours.set_adapter(active)
        with hf_oracle():
            hf.set_adapter(active)
            expected = hf(**inputs).logits
        torch.testing.assert_close(ours(**inputs).logits, expected, rtol=0, atol=1e-5, msg=str(active))
    rows = ["h", "k", "l", "d"]
    out = ours(**inputs, adapter_names=rows).logits
    for i, name in enumerate(rows):
        ours.set_adapter(name)
        torch.testing.assert_close(out[i], ours(**inputs).logits[i], rtol=0, atol=1e-5)


def test_modules_to_save_per_adapter_equal_hf(tmp_path):
    """Each method's adapter brings its own copy of a saved head; one may be active at a time, as in HF."""
    configs = {"a": peft.LoraConfig(target_modules=["lin0", "lin1"], r=4, modules_to_save=["lin2"]),
               "b": peft.LoHaConfig(target_modules=["lin0", "lin1"], r=4, init_weights=False, modules_to_save=["lin2"])}
    with hf_oracle():
        for i, (name, config) in enumerate(configs.items()):
            model = peft.get_peft_model(make_model("mlp"), config)
            perturb(model, seed=20 + i)
            model.save_pretrained(tmp_path / name)
    inputs = make_inputs("mlp")
    ours = _load(pk, tmp_path, ["a", "b"])
    with hf_oracle():
        hf = _load(peft, tmp_path, ["a", "b"])
    for name in ("a", "b"):
        ours.set_adapter(name)
        with hf_oracle():
            hf.set_adapter(name)
            expected = hf(**inputs)
        torch.testing.assert_close(ours(**inputs), expected, rtol=0, atol=1e-6)
        assert ({n for n, p in ours.named_parameters() if p.requires_grad}
                == {n for n, p in hf.named_parameters() if p.requires_grad})
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
        ours.set_adapter(["a", "b"])


@pytest.mark.parametrize("kind", ["conv1d", "conv2d"])
def test_lora_loha_lokr_stacked_on_convs_equal_hf(kind, tmp_path):
    """LoHa/LoKr pick the convolution from the plain conv at the bottom of the chain (not from the
    adapter layer directly below them): a Conv1d stack once ran F.conv2d."""
    configs = {"a": peft.LoraConfig(target_modules=["conv0", "conv1"], r=2),
               "b": peft.LoHaConfig(target_modules=["conv0", "conv1"], r=2, init_weights=False),
               "c": peft.LoKrConfig(target_modules=["conv1"], r=2, init_weights=False)}
    with hf_oracle():
        for i, (name, config) in enumerate(configs.items()):
            model = peft.get_peft_model(make_model(kind), config)
            perturb(model, seed=30 + i)
            model.save_pretrained(tmp_path / name)
    inputs = make_inputs(kind)
    ours = _load(pk, tmp_path, list(configs), kind)
    with hf_oracle():
        hf = _load(peft, tmp_path, list(configs), kind)
    for active in (["a", "b", "c"], ["b", "c"]):
        ours.set_adapter(active)
        with hf_oracle():
            hf.set_adapter(active)
            expected = hf(**inputs)
        torch.testing.assert_close(ours(**inputs), expected, rtol=0, atol=1e-5, msg=str(active))
    merged = ours.merge_and_unload()
    torch.testing.assert_close(merged(**inputs), expected, rtol=0, atol=1e-5)


def _ia3_oracle(x, weight, bias, lora_delta, l, feedforward, ia3_below):
    """The hand formula for one nn.Linear with a LoRA adapter (delta ``lora_delta`` = s*B@A) and an
    (IA)^3 vector ``l`` stacked on it: each layer applies its method to what the layers below give."""
    if ia3_below:  # LoRA(IA3(linear))
        inner = (x * l) @ weight.T + bias if feedforward else (x @ weight.T + bias) * l
        return inner + x @ lora_delta.T
    # IA3(LoRA(linear))
    if feedforward:
        return (x * l) @ (weight + lora_delta).T + bias
    return (x @ (weight + lora_delta).T + bias) * l


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("ia3_below", [False, True])
def test_ia3_stacks_with_lora_against_the_hand_formula(feedforward, ia3_below):
    """Beyond HF PEFT (its PeftMixedModel refuses IA3): (IA)^3 scales the output (or the input, for
    feedforward modules) of whatever is below it, so it stacks with additive methods either way.
    Checked against the formula, merged and unmerged, and in mixed batches."""
    torch.manual_seed(0)
    lora = pk.LoraConfig(target_modules=["lin1"], r=2, init_lora_weights=False)
    ia3 = pk.IA3Config(target_modules=["lin1"], feedforward_modules=["lin1"] if feedforward else [],
                       init_ia3_weights=False)
    first, second = (("i", ia3), ("l", lora)) if ia3_below else (("l", lora), ("i", ia3))
    model = pk.get_peft_model(make_model("mlp"), first[1], adapter_name=first[0], mixed=True).eval()
    model.add_adapter(*second)
    model.set_adapter(["l", "i"])
    lin1 = model.base_model.model.lin1
    assert (lin1.peft_type, lin1.base_layer.peft_type) == (("LORA", "IA3") if ia3_below else ("IA3", "LORA"))
    lora_layer = lin1 if lin1.peft_type == "LORA" else lin1.base_layer
    ia3_layer = lin1 if lin1.peft_type == "IA3" else lin1.base_layer
    plain = lora_layer.base_layer if ia3_layer is lin1 else ia3_layer.base_layer
    weight, bias = plain.weight.detach().clone(), plain.bias.detach().clone()
    delta = (lora_layer.lora_B["l"].weight @ lora_layer.lora_A["l"].weight * lora_layer.scaling["l"]).detach()
    l = ia3_layer.ia3_l["i"].detach().flatten()
    h = torch.randn(4, weight.shape[1])
    expected = _ia3_oracle(h, weight, bias, delta, l, feedforward, ia3_below)
    torch.testing.assert_close(lin1(h), expected, rtol=0, atol=1e-5)
    inputs = make_inputs("mlp")
    # each row on its own adapter (or the base) equals a run with that adapter alone
    rows = ["l", "i", "__base__", "l"]
    out = model(**inputs, adapter_names=rows)
    for i, name in enumerate(rows):
        if name == "__base__":
            with model.disable_adapter():
                single = model(**inputs)
        else:
            model.set_adapter(name)
            single = model(**inputs)
        torch.testing.assert_close(out[i], single[i], rtol=0, atol=1e-6)
    model.set_adapter(["l", "i"])
    adapted = model(**inputs)
    model.merge_adapter()
    torch.testing.assert_close(lin1(h), expected, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(plain.weight, weight, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain.bias, bias, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.merge_and_unload()(**inputs), adapted, rtol=0, atol=1e-5)


def test_hf_mixed_model_refuses_ia3_ours_accepts_it():
    with pytest.raises(ValueError, match="not compatible"):
        peft.PeftMixedModel(make_model("mlp"), peft.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    model = pk.PeftMixedModel(make_model("mlp"), pk.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    model.add_adapter("l", pk.LoraConfig(target_modules=["lin0"]))
    assert model.base_model.model.lin0.peft_type == "LORA"


def test_oft_on_conv2d_refuses_to_stack_over_another_adapter_but_may_sit_below(tmp_path):
    """OFT's Conv2d layer runs the rotated convolution itself (it never calls the layer below), so on
    top of a LoRA layer it would drop the LoRA: refused (the layer declares ``stack_refusal``), and
    the model is left as it was, for add_adapter and load_adapter alike. Below other methods it works,
    and merging agrees with the unmerged forward."""
    inputs = make_inputs("conv2d")
    model = pk.get_peft_model(make_model("conv2d"), pk.LoraConfig(target_modules=["conv0", "conv1"],
                                                                  init_lora_weights=False), mixed=True).eval()
    structure, expected = repr(model), model(**inputs)
    oft = pk.OFTConfig(target_modules=["conv1"], r=2, oft_block_size=0, init_weights=False)
    with pytest.raises(ValueError, match="cannot be stacked on the LORA adapter layer at 'conv1'"):
        model.add_adapter("o", oft)
    pk.get_peft_model(make_model("conv2d"), oft).save_pretrained(tmp_path / "o")
    with pytest.raises(ValueError, match="add the OFT adapter for Conv2d modules first"):
        model.load_adapter(tmp_path / "o", "o")
    assert sorted(model.peft_config) == ["default"] and repr(model) == structure
    torch.testing.assert_close(model(**inputs), expected, rtol=0, atol=0)
    below = pk.get_peft_model(make_model("conv2d"), oft, adapter_name="o", mixed=True).eval()
    below.add_adapter("l", pk.LoraConfig(target_modules=["conv0", "conv1"], init_lora_weights=False))
    below.set_adapter(["o", "l"])
    adapted = below(**inputs)
    torch.testing.assert_close(below.merge_and_unload()(**inputs), adapted, rtol=0, atol=1e-5)


def test_add_weighted_adapter_combines_one_methods_adapters_and_refuses_mixing_methods():
    """Beyond HF PEFT (its MixedModel raises NotImplementedError): LoRA adapters of a mixed model
    combine as in a plain model; a LoRA and a LoHa adapter are refused with a clear error."""
    inputs = make_inputs("mlp")

    def build(mixed):
        torch.manual_seed(0)
        model = pk.get_peft_model(make_model("mlp"), pk.LoraConfig(target_modules=["lin0", "lin1"], r=2,
                                                                   init_lora_weights=False), mixed=mixed)
        model.add_adapter("b", pk.LoraConfig(target_modules=["lin0", "lin1"], r=2, init_lora_weights=False))
        return model.eval()

    with hf_oracle():
        hf = peft.get_peft_model(make_model("mlp"), peft.LoraConfig(target_modules=["lin0"]), mixed=True)
        hf.add_adapter("b", peft.LoraConfig(target_modules=["lin0"]))
        with pytest.raises(NotImplementedError):
            hf.base_model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "c")
    plain, mixed = build(False), build(True)
    for model in (plain, mixed):
        model.base_model.add_weighted_adapter(["default", "b"], [0.7, 0.4], "c", combination_type="linear")
        model.set_adapter("c")
    torch.testing.assert_close(mixed(**inputs), plain(**inputs), rtol=0, atol=0)
    mixed.add_adapter("h", pk.LoHaConfig(target_modules=["lin1"], r=2))
    structure = repr(mixed)
    with pytest.raises(ValueError, match="adapters of different methods cannot be combined"):
        mixed.base_model.add_weighted_adapter(["default", "h"], [0.5, 0.5], "d", combination_type="linear")
    assert "d" not in mixed.peft_config and repr(mixed) == structure


@pytest.mark.parametrize("order, merge, differs", [("lo", ["o"], True), ("ol", ["l"], True), ("lo", ["l"], False),
                                                   ("ol", ["o"], False), ("lo", None, False)])
def test_merging_a_layer_above_an_unmerged_one_warns(order, merge, differs):
    """A merged outer layer's change also passes through the unmerged layers below it: exact for
    additive methods only. HF PEFT's mixed model gives the same numbers silently; here it warns.
    Merging inside out (a layer below, or everything) is exact and quiet."""
    inputs = make_inputs("mlp")
    torch.manual_seed(0)
    configs = {"l": pk.LoraConfig(target_modules=["lin1"], init_lora_weights=False),
               "o": pk.OFTConfig(target_modules=["lin1"], r=2, oft_block_size=0, init_weights=False)}
    model = pk.get_peft_model(make_model("mlp"), configs[order[0]], adapter_name=order[0], mixed=True).eval()
    model.add_adapter(order[1], configs[order[1]])
    model.set_adapter(list(order))
    expected = model(**inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter(adapter_names=merge)
    warned = [w for w in caught if "merge inside out" in str(w.message)]
    assert bool(warned) == differs
    close = torch.allclose(model(**inputs), expected, rtol=0, atol=1e-5)
    assert close != differs


@pytest.mark.parametrize("kind, targets", [("mlp", ["lin0", "lin1"]), ("conv2d", ["conv0", "conv1"])])
def test_ia3_in_a_three_method_stack_saves_loads_and_merges(kind, targets, tmp_path):
    inputs = make_inputs(kind)
    torch.manual_seed(0)
    model = pk.get_peft_model(make_model(kind), pk.LoraConfig(target_modules=targets, init_lora_weights=False),
                              mixed=True).eval()
    model.add_adapter("i", pk.IA3Config(target_modules=targets, feedforward_modules=targets[:1], init_ia3_weights=False))
    model.add_adapter("h", pk.LoHaConfig(target_modules=targets, init_weights=False))
    model.set_adapter(["default", "i", "h"])
    expected = model(**inputs)
    with model.disable_adapter():
        assert not torch.allclose(model(**inputs), expected)
    model.save_pretrained(tmp_path / "mixed")
    back = pk.PeftMixedModel.from_pretrained(make_model(kind), tmp_path / "mixed").eval()
    torch.testing.assert_close(back(**inputs), expected, rtol=0, atol=0)
    torch.testing.assert_close(model.merge_and_unload()(**inputs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("manifest", ["[1, 2]", "{not json", '{"format": "x", "adapters": ["a"]}', "\xff\xfe"])
def test_a_broken_manifest_is_a_checkpoint_error(saved, tmp_path, manifest):
    ours = _load(pk, saved)
    ours.save_pretrained(tmp_path / "mixed")
    (tmp_path / "mixed" / "mixed_adapters.json").write_bytes(manifest.encode("latin-1"))
    with pytest.raises(pk.CheckpointError, match="mixed_adapters.json"):
        pk.PeftMixedModel.from_pretrained(make_model("mlp"), tmp_path / "mixed")


def test_a_failed_mixed_load_gives_the_callers_model_back(saved, tmp_path):
    """Manifest loads are transactions too: a bad later sub-folder releases the whole stack, and
    base weights that a PiSSA adapter rewrote are restored."""
    pissa = pk.get_peft_model(make_model("mlp"), pk.LoraConfig(target_modules=["lin0"], r=2, init_lora_weights="pissa"))
    ours = pk.get_peft_model(make_model("mlp"), pk.LoraConfig(target_modules=["lin1"], r=2), mixed=True)
    ours.add_adapter("p", pissa.peft_config["default"])
    ours.save_pretrained(tmp_path / "mixed")
    weights = tmp_path / "mixed" / "p" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # the PiSSA adapter, loaded second, is truncated
    base = make_model("mlp")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    flags = {k: p.requires_grad for k, p in base.named_parameters()}
    with pytest.raises(pk.CheckpointError):
        pk.PeftMixedModel.from_pretrained(base, tmp_path / "mixed")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert {k: p.requires_grad for k, p in base.named_parameters()} == flags
    assert not any(isinstance(m, pk.AdapterLayer) for m in base.modules())
