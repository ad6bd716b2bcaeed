"""``add_weighted_adapter`` for LoRA against HF PEFT (the oracle): every combination type on
adapters of equal and of different ranks, negative weights, rsLoRA, ``modules_to_save``, Conv1D
(``fan_in_fan_out``), embeddings and conv layers, HF's refusals, and the
``peft_kernel_combine_adapters`` hook itself.

Random (DARE) pruning draws its masks in HF's order, so under the same ``torch.manual_seed`` the
combined adapters are equal to HF's even with ``density < 1``.
"""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

import peft_kernel as pk  # noqa: E402
from peft_kernel.errors import UnsupportedFeatureError  # noqa: E402
from peft_kernel.markers import hookimpl  # noqa: E402
from peft_kernel_testing.hf_oracle import hf_oracle, perturb  # noqa: E402
from peft_kernel_testing.models import make_inputs, make_model, output_tensor  # noqa: E402

TYPES = ["svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
         "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd"]
PRUNING = {"ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
           "magnitude_prune_svd"}
TOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def pair(kind: str, configs: dict[str, dict], seed: int = 0):
    """(HF model, our model) holding the same adapters with the same non-trivial weights."""
    base = make_model(kind, seed)
    names = list(configs)
    with hf_oracle("HF peft building the reference adapters"):
        hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**configs[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            hf.add_adapter(name, peft.LoraConfig(**configs[name]))
    ours = pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(**configs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        ours.add_adapter(name, pk.LoraConfig(**configs[name]))
    for i, name in enumerate(names):
        hf.set_adapter(name)
        perturb(hf, seed=10 + i)
        result = pk.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(hf, adapter_name=name), adapter_name=name)
        assert not result.missing_keys and not result.unexpected_keys
    return hf.eval(), ours.eval()


def combine_both(hf, ours, *args, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    with hf_oracle("HF peft add_weighted_adapter"):
        hf.add_weighted_adapter(*args, **kwargs)
    torch.manual_seed(seed)
    ours.add_weighted_adapter(*args, **kwargs)


def assert_same_adapter(hf, ours, kind: str, name: str) -> None:
    """Same tensors, same config values that matter, same outputs with the new adapter active."""
    theirs = peft.get_peft_model_state_dict(hf, adapter_name=name)
    mine = pk.get_peft_model_state_dict(ours, adapter_name=name)
    assert sorted(theirs) == sorted(mine)
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], atol=TOL, rtol=0, msg=key)
    hc, oc = hf.peft_config[name], ours.peft_config[name]
    assert (oc.r, oc.lora_alpha, oc.use_rslora) == (hc.r, hc.lora_alpha, hc.use_rslora)
    assert oc.target_modules == hc.target_modules
    assert not any(p.requires_grad for n, p in ours.named_parameters() if f".{name}." in n)
    hf.set_adapter(name)
    ours.set_adapter(name)
    inputs = make_inputs(kind)
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(ours(**inputs)), output_tensor(hf(**inputs)), atol=TOL, rtol=0)


def cfg(r: int, targets=("lin0", "lin1"), **kw) -> dict:
    return dict(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, **kw)


@pytest.mark.parametrize("combination_type", TYPES)
def test_equal_ranks_every_type_equals_hf(combination_type):
    hf, ours = pair("mlp", {"a": cfg(4), "b": cfg(4), "c": cfg(4)})
    density = 0.5 if combination_type in PRUNING else None
    combine_both(hf, ours, ["a", "b", "c"], [0.7, -0.4, 1.2], "m", combination_type=combination_type, density=density)
    assert_same_adapter(hf, ours, "mlp", "m")
    assert ours.active_adapters == ["m"]


@pytest.mark.parametrize("combination_type", [t for t in TYPES if t == "cat" or t.endswith("svd")])
def test_different_ranks_and_targets_equal_hf(combination_type):
    hf, ours = pair("mlp", {"a": cfg(2, ("lin0", "lin1")), "b": cfg(3, ("lin1", "lin2"))})
    density = 0.6 if combination_type in PRUNING else None
    combine_both(hf, ours, ["a", "b"], [1.0, -0.5], "m", combination_type=combination_type, density=density,
                 majority_sign_method="frequency")
    assert_same_adapter(hf, ours, "mlp", "m")


def test_svd_rank_above_a_layer_dimension_is_exact():
    """HF gives such a layer factors of mismatched shapes (lin2 is 16 -> 4, rank 6); here the extra
    rank is zero-padded and the combined delta is exact."""
    _, ours = pair("mlp", {"a": cfg(6, ("lin1", "lin2")), "b": cfg(6, ("lin1", "lin2"))})
    ours.add_weighted_adapter(["a", "b"], [1.0, -0.5], "m", combination_type="svd")
    layer = ours.base_model.model.lin2
    want = sum(w * layer.lora_weight(n) * layer.scaling[n] for n, w in (("a", 1.0), ("b", -0.5)))
    torch.testing.assert_close(layer.lora_weight("m") * layer.scaling["m"], want, atol=TOL, rtol=0)


@pytest.mark.parametrize("combination_type", ["svd", "ties_svd"])
def test_svd_rank_and_clamp_equal_hf(combination_type):
    hf, ours = pair("mlp", {"a": cfg(3), "b": cfg(6)})
    combine_both(hf, ours, ["a", "b"], [0.5, 0.5], "m", combination_type=combination_type, svd_rank=4, svd_clamp=0.9,
                 svd_full_matrices=False, density=0.7)
    assert ours.peft_config["m"].r == 4
    assert_same_adapter(hf, ours, "mlp", "m")


@pytest.mark.parametrize("combination_type", ["svd", "linear", "cat", "dare_ties"])
def test_rslora_equals_hf(combination_type):
    hf, ours = pair("mlp", {"a": cfg(4, use_rslora=True), "b": cfg(4, use_rslora=True)})
    combine_both(hf, ours, ["a", "b"], [0.6, 0.9], "m", combination_type=combination_type, density=0.4)
    assert_same_adapter(hf, ours, "mlp", "m")


@pytest.mark.parametrize("kind,targets", [("gpt2-conv1d", ["c_attn", "c_proj"]), ("embedding", ["emb", "lin"]),
                                          ("conv2d", ["conv", "lin"])])
@pytest.mark.parametrize("combination_type", ["svd", "linear", "cat", "ties"])
def test_layer_types_equal_hf(kind, targets, combination_type):
    model = make_model(kind)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in targets if t in names] or None
    if targets is None:
        pytest.skip(f"no such modules in {kind}: {sorted(names)}")
    extra = {"fan_in_fan_out": True} if kind == "gpt2-conv1d" else {}
    hf, ours = pair(kind, {"a": cfg(3, targets, **extra), "b": cfg(3, targets, **extra)})
    combine_both(hf, ours, ["a", "b"], [0.8, 0.3], "m", combination_type=combination_type, density=0.5)
    assert_same_adapter(hf, ours, kind, "m")


def test_modules_to_save_as_hf():
    hf, ours = pair("mlp", {"a": cfg(4, modules_to_save=["lin2"]), "b": cfg(4)})
    combine_both(hf, ours, ["a", "b"], [1.0, 1.0], "m", combination_type="linear")
    assert_same_adapter(hf, ours, "mlp", "m")
    hf2, ours2 = pair("mlp", {"a": cfg(4, modules_to_save=["lin2"]), "b": cfg(4, modules_to_save=["lin2"])})
    for model in (hf2, ours2):
        with pytest.raises(ValueError, match="target the same module with modules_to_save"):
            model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="linear")
    assert "m" not in ours2.peft_config


def test_single_adapter_is_linear_and_existing_name_is_a_no_op():
    hf, ours = pair("mlp", {"a": cfg(4), "b": cfg(2)})
    combine_both(hf, ours, ["a"], [2.0], "m", combination_type="svd")  # one adapter: linear, as HF
    assert_same_adapter(hf, ours, "mlp", "m")
    before = {k: v.clone() for k, v in pk.get_peft_model_state_dict(ours, adapter_name="m").items()}
    ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="cat")
    after = pk.get_peft_model_state_dict(ours, adapter_name="m")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_refusals_as_hf():
    hf, ours = pair("mlp", {"a": cfg(4), "b": cfg(2)})
    for model in (hf, ours):
        for combination_type in ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune"):
            with pytest.raises(ValueError, match="All adapters must have the same r value"):
                model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type=combination_type, density=0.5)
        with pytest.raises(ValueError, match="Invalid combination_type"):
            model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="bogus")
        with pytest.raises(ValueError, match="Adapter nope does not exist"):
            model.add_weighted_adapter(["a", "nope"], [1.0, 1.0], "m")
    assert "m" not in ours.peft_config
    hf3, ours3 = pair("mlp", {"a": cfg(4), "b": dict(cfg(4), target_modules="lin[01]")})
    for model in (hf3, ours3):
        with pytest.raises(ValueError, match="same target modules type"):
            model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="svd")


def test_regex_targets_join_as_hf():
    hf, ours = pair("mlp", {"a": dict(cfg(4), target_modules="lin0"), "b": dict(cfg(4), target_modules="lin[12]")})
    combine_both(hf, ours, ["a", "b"], [0.5, 1.5], "m", combination_type="svd")
    assert ours.peft_config["m"].target_modules == "(lin0)|(lin[12])"
    assert_same_adapter(hf, ours, "mlp", "m")


def test_failure_leaves_no_adapter_behind():
    _, ours = pair("mlp", {"a": cfg(4), "b": cfg(4)})
    with pytest.raises(RuntimeError):  # cuSOLVER drivers exist only on CUDA
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="svd", svd_driver="gesvdj")
    assert "m" not in ours.peft_config
    assert not any(".m." in n for n, _ in ours.named_parameters())
    assert ours.active_adapters == ["a"]


def test_dora_is_refused_clearly():
    _, ours = pair("mlp", {"a": cfg(4, use_dora=True), "b": cfg(4)})
    with pytest.raises(ValueError, match="DoRA"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="linear")
    assert "m" not in ours.peft_config


def test_dare_with_density_one_is_task_arithmetic():
    hf, ours = pair("mlp", {"a": cfg(4), "b": cfg(4)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.add_weighted_adapter(["a", "b"], [0.3, 0.9], "dare", combination_type="dare_linear", density=1.0)
        ours.add_weighted_adapter(["a", "b"], [0.3, 0.9], "lin", combination_type="linear")
    dare = pk.get_peft_model_state_dict(ours, adapter_name="dare")
    lin = pk.get_peft_model_state_dict(ours, adapter_name="lin")
    for key in dare:
        torch.testing.assert_close(dare[key], lin[key], atol=TOL, rtol=0)


def test_method_without_combination_refuses():
    model = pk.get_peft_model(make_model("mlp"), pk.LoHaConfig(r=2, target_modules=["lin0"]), adapter_name="a")
    model.add_adapter("b", pk.LoHaConfig(r=2, target_modules=["lin0"]))
    with pytest.raises(UnsupportedFeatureError, match="cannot be combined"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m")
    assert "m" not in model.peft_config


def test_a_plugin_can_take_over_peft_kernel_combine_adapters(isolated_registry):
    """A third-party ``peft_kernel_combine_adapters`` (tryfirst) decides the combination, no core change."""
    calls = []

    @hookimpl(tryfirst=True)
    def peft_kernel_combine_adapters(config, adapters, configs, weights, combination_type, options):
        if combination_type != "first_only":
            return None
        calls.append((list(adapters), list(weights), options["density"]))

        def fill(layer, adapter_name):
            with torch.no_grad():
                layer.lora_A[adapter_name].weight.copy_(layer.lora_A[adapters[0]].weight)
                layer.lora_B[adapter_name].weight.copy_(layer.lora_B[adapters[0]].weight)

        return configs[0], fill

    isolated_registry(disabled=[], extra_plugins={"first": types.SimpleNamespace(
        peft_kernel_combine_adapters=peft_kernel_combine_adapters)})
    _, ours = pair("mlp", {"a": cfg(4), "b": cfg(4)})
    ours.add_weighted_adapter(["a", "b"], [1.0, 2.0], "m", combination_type="first_only", density=0.3)
    assert calls == [(["a", "b"], [1.0, 2.0], 0.3)]
    first = pk.get_peft_model_state_dict(ours, adapter_name="a")
    new = pk.get_peft_model_state_dict(ours, adapter_name="m")
    assert all(torch.equal(first[k], new[k]) for k in first)
    ours.add_weighted_adapter(["a", "b"], [1.0, 2.0], "n", combination_type="cat")  # LoRA's own still answers
    assert ours.peft_config["n"].r == 8


def test_combined_adapter_serves_mixed_batches_and_merges():
    """The combined adapter's tensors are written after injection: mixed-batch stacks and merges see them."""
    _, ours = pair("mlp", {"a": cfg(4), "b": cfg(4)})
    inputs = make_inputs("mlp")
    (key, x), = inputs.items()
    names = ["a", "m", "b", "m"][: x.shape[0]] + ["m"] * max(0, x.shape[0] - 4)
    with torch.no_grad():
        ours(**inputs, adapter_names=[n if n != "m" else "a" for n in names])  # stacks built before "m" exists
        ours.add_weighted_adapter(["a", "b"], [0.5, 1.5], "m", combination_type="svd")
        mixed = output_tensor(ours(**inputs, adapter_names=names))
        rows = []
        for i, name in enumerate(names):
            ours.set_adapter(name)
            rows.append(output_tensor(ours(**{key: x[i : i + 1]})))
        torch.testing.assert_close(mixed, torch.cat(rows), atol=TOL, rtol=0)
        ours.set_adapter("m")
        unmerged = output_tensor(ours(**inputs))
        ours.merge_adapter()
        torch.testing.assert_close(output_tensor(ours(**inputs)), unmerged, atol=TOL, rtol=0)


@pytest.mark.parametrize("combination_type", ["svd", "cat", "dare_linear_svd"])
def test_rank_and_alpha_patterns_equal_hf(combination_type):
    hf, ours = pair("mlp", {"a": cfg(2, ("lin0", "lin1"), rank_pattern={"lin1": 4}, alpha_pattern={"lin0": 7}),
                            "b": cfg(3, ("lin0", "lin1"), alpha_pattern={"lin1": 1})})
    combine_both(hf, ours, ["a", "b"], [1.2, -0.7], "m", combination_type=combination_type, density=0.5)
    assert ours.peft_config["m"].rank_pattern == {} and ours.peft_config["m"].alpha_pattern == {}
    assert_same_adapter(hf, ours, "mlp", "m")
