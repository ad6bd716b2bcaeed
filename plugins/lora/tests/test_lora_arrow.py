"""Arrow routing and GenKnowSub (``LoraConfig.arrow_config``, ``create_arrow_model``) against HF
PEFT's ``create_arrow_model`` on a tiny llama, with task and general adapters saved with random
weights by HF and by us; and against an independent per-expert reference of the routing formula."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import peft_kernel
from peft_kernel.plugin_api import ConfigError
from peft_kernel_lora.arrow import ArrowMergeError
from peft_kernel_testing.models import make_inputs, make_model, output_tensor

peft = pytest.importorskip("peft")

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj"]


def _save(lib, folder, seed: int, r: int = 4, alpha: int = 8, targets=TARGETS, lora_bias: bool = False) -> str:
    model = make_model("llama")
    torch.manual_seed(seed)
    config = lib.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, lora_bias=lora_bias)
    peft_model = lib.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    path = str(folder / f"{lib.__name__}-{seed}-{r}-{'-'.join(targets)}-{lora_bias}")
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arrow")
    tasks = [_save(peft, folder, 20, alpha=8), _save(peft_kernel, folder, 21, alpha=12), _save(peft, folder, 22, alpha=6)]
    general = [_save(peft_kernel, folder, 40), _save(peft, folder, 41, alpha=10)]
    odd = {"rank": _save(peft, folder, 50, r=8), "targets": _save(peft, folder, 51, targets=["q_proj"]),
           "extra": _save(peft_kernel, folder, 52, alpha=16)}
    return {"tasks": tasks, "general": general, **odd}


INPUTS = make_inputs("llama")


def _arrow(lib, saved, seed: int = 5, general: bool = False, **arrow):
    extra = {"general_adapter_paths": saved["general"]} if general else {}
    model = lib.create_arrow_model(make_model("llama"), saved["tasks"], lib.ArrowConfig(**arrow), **extra)
    torch.manual_seed(seed)  # prototypes are drawn from the global RNG at the first forward when rng_seed is None
    return model


def _logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**INPUTS, **kwargs))


def _router(model, layer: int = 0, module: str = "q_proj"):
    lora = getattr(model.base_model.model.model.layers[layer].self_attn, module)
    return lora, lora.lora_arrow["arrow_router"]


@pytest.mark.parametrize("use_gks", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 4.0])
def test_logits_equal_hf(saved, use_gks, top_k, temperature):
    kwargs = dict(top_k=top_k, router_temperature=temperature, use_gks=use_gks)
    ours = _arrow(peft_kernel, saved, general=use_gks, **kwargs)
    out = _logits(ours)  # each model's first forward right after _arrow seeds the global RNG
    theirs = _arrow(peft, saved, general=use_gks, **kwargs)
    assert (out - _logits(theirs)).abs().max() <= ATOL
    assert (out - _logits(make_model("llama"))).abs().max() > 1e-2  # the experts do act
    assert list(ours.peft_config) == list(theirs.peft_config)
    assert ours.active_adapters == theirs.active_adapters == ["arrow_router"]


def test_prototypes_equal_hf_and_are_top_singular_vectors(saved):
    ours, theirs = _arrow(peft_kernel, saved, rng_seed=7), _arrow(peft, saved, rng_seed=7)
    _logits(ours), _logits(theirs)
    for layer in (0, 1):
        for module in TARGETS:
            lora, router = _router(ours, layer, module)
            assert torch.allclose(router.prototypes, _router(theirs, layer, module)[1].prototypes, atol=1e-6)
            for name, proto in zip(router.task_adapter_names, router.prototypes):
                top = torch.linalg.svd(lora.lora_B[name].weight @ lora.lora_A[name].weight)[2][0]
                assert abs(float(top @ proto)) > 0.99  # power iteration: the top singular direction
    _, router = _router(ours)
    again = _arrow(peft_kernel, saved, seed=99, rng_seed=7)  # rng_seed, not the global RNG, decides
    _logits(again)
    assert torch.equal(_router(again)[1].prototypes, router.prototypes)


@pytest.mark.parametrize("lora_bias", [False, True])
def test_forward_equals_reference_routing(saved, tmp_path, lora_bias):
    """Per token, the top-2 experts' ``scaling * lora_B(lora_A(x))`` (with ``lora_B``'s bias when the
    experts have ``lora_bias=True``) mixed by the softmax of their ``|x . prototype| / T``, one expert at
    a time. HF PEFT 0.21.2 drops the experts' ``lora_B`` biases in the routed forward: there its
    logits differ from this reference (checked below), ours do not."""
    if lora_bias:
        saved = {**saved, "tasks": [_save(peft, tmp_path, 70 + i, lora_bias=True) for i in range(3)]}
    model = _arrow(peft_kernel, saved, top_k=2, router_temperature=0.7)
    lora, router = _router(model)
    seen = {}
    handle = lora.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    _logits(model)
    handle.remove()
    x = seen["x"]
    scores = (x @ router.prototypes.T).abs()
    top = scores.topk(2, dim=-1)
    probs = torch.softmax(top.values / 0.7, dim=-1)
    expected = lora.base_layer(x)
    for slot in range(2):
        for e, name in enumerate(router.task_adapter_names):
            chosen = (top.indices[..., slot] == e).unsqueeze(-1)
            out = lora.lora_B[name](lora.lora_A[name](x)) * lora.scaling[name]
            expected = expected + torch.where(chosen, probs[..., slot:slot + 1] * out, 0)
    assert (seen["y"] - expected).abs().max() <= ATOL
    if lora_bias:
        hf = _arrow(peft, saved, top_k=2, router_temperature=0.7)
        assert (_logits(hf) - _logits(_arrow(peft_kernel, saved, top_k=2, router_temperature=0.7))).abs().max() > 1e-3


def test_gks_subtracts_general_mean_once(saved):
    model = _arrow(peft_kernel, saved, use_gks=True, general=True)
    lora, router = _router(model)
    before = {n: lora.lora_A[n].weight.clone() for n in (*router.task_adapter_names, "gks_0", "gks_1")}
    _logits(model)
    _logits(model)
    mean = (before["gks_0"] + before["gks_1"]) / 2
    for name in router.task_adapter_names:
        assert torch.allclose(lora.lora_A[name].weight, before[name] - mean, atol=1e-7)
    assert torch.equal(lora.lora_A["gks_0"].weight, before["gks_0"])


def test_general_adapters_ignored_without_gks(saved):
    ours = _arrow(peft_kernel, saved, general=True)
    theirs = _arrow(peft, saved, general=True)
    assert list(ours.peft_config) == list(theirs.peft_config) == ["task_0", "task_1", "task_2", "arrow_router"]


def test_save_load_as_hf(saved, tmp_path):
    ours, theirs = _arrow(peft_kernel, saved, rng_seed=3), _arrow(peft, saved, rng_seed=3)
    expected = _logits(theirs)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "hf")
    for name in ("task_0", "task_1", "task_2", "arrow_router"):
        with open(tmp_path / "ours" / name / "adapter_config.json") as f, \
                open(tmp_path / "hf" / name / "adapter_config.json") as g:
            mine, hf = json.load(f), json.load(g)
        assert mine["arrow_config"] == hf["arrow_config"]
        keys = sorted(load_file(tmp_path / "ours" / name / "adapter_model.safetensors"))
        assert keys == sorted(load_file(tmp_path / "hf" / name / "adapter_model.safetensors"))
    for folder in ("ours", "hf"):  # HF 0.21.2 cannot load an arrow_router folder back ('NoneType'.copy)
        for order in (("task_0", "task_1", "task_2", "arrow_router"), ("arrow_router", "task_0", "task_1", "task_2")):
            model = peft_kernel.PeftModel.from_pretrained(make_model("llama"), str(tmp_path / folder / order[0]),
                                                          adapter_name=order[0])
            for name in order[1:]:
                model.load_adapter(str(tmp_path / folder / name), adapter_name=name)
            model.set_adapter("arrow_router")
            assert (_logits(model) - expected).abs().max() <= ATOL


def test_router_alone_names_missing_experts(saved, tmp_path):
    _arrow(peft_kernel, saved).save_pretrained(tmp_path)
    model = peft_kernel.PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "arrow_router"),
                                                  adapter_name="arrow_router")
    with pytest.raises(ConfigError, match=r"task_0.*not loaded"):
        _logits(model)


@pytest.mark.parametrize("use_gks", [False, True])
def test_adapter_added_after_prototypes_becomes_expert(saved, use_gks):
    models = [_arrow(lib, saved, use_gks=use_gks, general=use_gks, top_k=2) for lib in (peft_kernel, peft)]
    for model in models:
        _logits(model)
        model.load_adapter(saved["extra"], adapter_name="extra")
        model.set_adapter("arrow_router")
    torch.manual_seed(11)
    out = _logits(models[0])
    torch.manual_seed(11)
    assert (out - _logits(models[1])).abs().max() <= ATOL
    _, router = _router(models[0])
    assert router.task_adapter_names == ["task_0", "task_1", "task_2", "extra"]
    assert router.prototypes.shape[0] == 4


def test_deleted_expert_leaves_the_router(saved):
    model = _arrow(peft_kernel, saved, rng_seed=1, top_k=2)
    _logits(model)
    model.delete_adapter("task_2")  # HF 0.21.2: KeyError 'task_2' at the next forward
    fewer = peft_kernel.create_arrow_model(make_model("llama"), saved["tasks"][:2], peft_kernel.ArrowConfig(top_k=2, rng_seed=1))
    assert (_logits(model) - _logits(fewer)).abs().max() <= ATOL


def test_mixed_batch_rows_equal_single_runs(saved):
    model = _arrow(peft_kernel, saved, top_k=2, rng_seed=2)
    names = ["arrow_router", "task_1", "__base__", "arrow_router"]
    mixed = _logits(model, adapter_names=names)
    hf = _arrow(peft, saved, top_k=2, rng_seed=2)
    assert (mixed - _logits(hf, adapter_names=names)).abs().max() <= ATOL
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                single = _logits(model)
        else:
            model.set_adapter(name)
            single = _logits(model)
        assert (mixed[row] - single[row]).abs().max() <= ATOL


def test_status_equal_hf(saved):
    ours, theirs = _arrow(peft_kernel, saved), _arrow(peft, saved)
    assert [vars(s) for s in ours.get_layer_status()] == [vars(s) for s in theirs.get_layer_status()]
    assert vars(ours.get_model_status()) == vars(theirs.get_model_status())
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_training_mode_like_hf(saved):
    """The router's own factors do not act and the experts are frozen: as in HF, a train-mode
    forward gives the eval logits with no gradient path."""
    outputs = []
    for lib in (peft_kernel, peft):
        model = _arrow(lib, saved, rng_seed=4)
        model.train()
        out = output_tensor(model(**INPUTS))
        assert not out.requires_grad
        outputs.append(out.detach())
    assert (outputs[0] - outputs[1]).abs().max() <= ATOL


def test_merge_refused_like_hf(saved):
    theirs = _arrow(peft, saved)
    with pytest.raises(RuntimeError, match="Cannot merge"):
        theirs.merge_and_unload()
    ours = _arrow(peft_kernel, saved)
    before = _logits(ours)
    with pytest.raises(ArrowMergeError, match="Cannot merge the Arrow router"):
        ours.merge_and_unload()
    assert isinstance(ArrowMergeError("x"), RuntimeError)
    assert (_logits(ours) - before).abs().max() == 0


def test_exports_and_config_round_trip():
    from peft_kernel_lora.arrow_config import ArrowConfig

    assert peft_kernel.ArrowConfig is ArrowConfig
    assert callable(peft_kernel.create_arrow_model)
    defaults = {f.name: f.default for f in dataclasses.fields(peft.ArrowConfig)}
    assert {k: getattr(ArrowConfig(), k) for k in defaults} == defaults
    config = peft_kernel.LoraConfig(arrow_config=ArrowConfig(top_k=2, task_adapter_names=["a", "b"], rng_seed=4))
    again = peft_kernel.LoraConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.arrow_config == config.arrow_config


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_k=0), "top_k"), (dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(router_temperature=0), "router_temperature"), (dict(router_temperature=-1.0), "router_temperature"),
    (dict(use_gks="yes"), "use_gks"), (dict(rng_seed="a"), "rng_seed"),
    (dict(task_adapter_names="task_0"), "task_adapter_names"),
])
def test_bad_arrow_config(kwargs, field):
    with pytest.raises(ConfigError, match=f"ArrowConfig.{field}"):
        peft_kernel.ArrowConfig(**kwargs)


def test_bad_arrow_setups(saved):
    with pytest.raises(TypeError):
        peft_kernel.ArrowConfig(bogus=1)
    with pytest.raises(ConfigError, match="unknown keys"):
        peft_kernel.LoraConfig(arrow_config={"bogus": 1})
    with pytest.raises(ConfigError, match="top_k=5"):  # HF: RuntimeError "selected index k out of range"
        _logits(_arrow(peft_kernel, saved, top_k=5))
    with pytest.raises(ConfigError, match="rank mismatch: 8 != 4"):
        peft_kernel.create_arrow_model(make_model("llama"), [*saved["tasks"], saved["rank"]], peft_kernel.ArrowConfig())
    with pytest.raises(ConfigError, match="do not target"):
        peft_kernel.create_arrow_model(make_model("llama"), [*saved["tasks"], saved["targets"]], peft_kernel.ArrowConfig())
    with pytest.raises(ConfigError, match="general LoRA paths"):
        peft_kernel.create_arrow_model(make_model("llama"), saved["tasks"], peft_kernel.ArrowConfig(use_gks=True))
    with pytest.raises(ConfigError, match="at least one"):
        peft_kernel.create_arrow_model(make_model("llama"), [], peft_kernel.ArrowConfig())
    with pytest.raises(TypeError, match="bogus"):  # HF 0.21.2 accepts and ignores unknown adapter_kwargs
        peft_kernel.create_arrow_model(make_model("llama"), saved["tasks"], peft_kernel.ArrowConfig(), bogus=1)
    with pytest.raises(ConfigError, match="must be an ArrowConfig"):
        peft_kernel.create_arrow_model(make_model("llama"), saved["tasks"], None)
    with pytest.raises(ConfigError, match="task_adapter_names is empty"):  # HF: AttributeError 'NoneType'.copy
        peft_kernel.get_peft_model(make_model("llama"), peft_kernel.LoraConfig(
            target_modules=TARGETS, arrow_config=peft_kernel.ArrowConfig()))
    model = peft_kernel.PeftModel.from_pretrained(make_model("llama"), saved["tasks"][0], adapter_name="a")
    model.add_adapter("router", peft_kernel.LoraConfig(target_modules=TARGETS, arrow_config=peft_kernel.ArrowConfig(
        top_k=1, task_adapter_names=["a", "nope"])))
    model.set_adapter("router")
    with pytest.raises(ConfigError, match=r"\['nope'\].*not loaded"):
        _logits(model)


def test_arrow_config_by_hand_equals_create_arrow_model(saved):
    """``LoraConfig(arrow_config=...)`` on a model holding the experts is what create_arrow_model builds."""
    model = peft_kernel.PeftModel.from_pretrained(make_model("llama"), saved["tasks"][0], adapter_name="a")
    model.load_adapter(saved["tasks"][1], adapter_name="b")
    model.load_adapter(saved["tasks"][2], adapter_name="c")
    model.add_adapter("router", peft_kernel.LoraConfig(r=4, target_modules=TARGETS, arrow_config=peft_kernel.ArrowConfig(
        top_k=2, rng_seed=6, task_adapter_names=["a", "b", "c"])))
    model.set_adapter("router")
    reference = _arrow(peft, saved, top_k=2, rng_seed=6)
    assert (_logits(model) - _logits(reference)).abs().max() <= ATOL


def test_router_only_on_linear_layers_like_hf(saved, tmp_path):
    """Experts that also target the embedding and lm_head: HF adds the router to Linear layers only
    (lm_head routes too, the embedding keeps its experts and no router); same logits and saved keys.
    (Layer status differs in one point, from the core: the embedding's active adapters are [] here,
    ['arrow_router'] in HF, which lists an active adapter the layer does not hold.)"""
    targets = ["embed_tokens", "q_proj", "lm_head"]
    paths = [_save(peft, tmp_path, 60 + i, targets=targets) for i in range(2)]
    outputs, keys = [], []
    for lib in (peft_kernel, peft):
        model = lib.create_arrow_model(make_model("llama"), paths, lib.ArrowConfig(top_k=1, rng_seed=1))
        outputs.append(_logits(model))
        model.save_pretrained(tmp_path / lib.__name__)
        keys.append(sorted(load_file(tmp_path / lib.__name__ / "arrow_router" / "adapter_model.safetensors")))
    assert (outputs[0] - outputs[1]).abs().max() <= ATOL
    assert keys[0] == keys[1] and not any("embed_tokens.lora" in k for k in keys[0])
