"""LoRA behaviours that once had no test (issue 19), each checked against HF ``peft`` (the oracle)
where HF defines the behaviour, and against single-adapter runs for the mixed-batch kernels.

1. mixed-batch stacks follow replaced storage (``p.data =``, ``load_state_dict(assign=True)``, ``.to()``)
2. DoRA merge -> unmerge gives the base *weight* back
3. ``disable_adapter()`` on a merged model gives the base model
4. merging twice folds nothing in twice (HF's warning)
5. several adapters with ``modules_to_save``: only the active adapter's copy trains
6. ``rank_pattern`` / ``alpha_pattern`` keys match dotted suffixes only
8. the fast mixed path with dropout in training mode equals the generic path
9. LoRA on an ``nn.Embedding`` with ``padding_idx``: gradients as HF's
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import peft_kernel as pk  # noqa: E402
from peft_kernel.layer import adapter_layers  # noqa: E402
from peft_kernel_testing.hf_oracle import perturb  # noqa: E402
from peft_kernel_testing.models import make_inputs, make_model, output_tensor  # noqa: E402
from peft_kernel_lowrank import mixed  # noqa: E402


def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**inputs)).detach().clone()


def lora_pair(kind: str, configs: dict[str, dict], seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base model, HF model, our model): the same adapters with the same non-trivial weights."""
    base = make_model(kind, seed)
    names = list(configs)
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**configs[names[0]]), adapter_name=names[0])
    ours = pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(**configs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        hf.add_adapter(name, peft.LoraConfig(**configs[name]))
        ours.add_adapter(name, pk.LoraConfig(**configs[name]))
    for i, name in enumerate(names):
        hf.set_adapter(name)
        perturb(hf, seed=10 + i)
        state = peft.get_peft_model_state_dict(hf, adapter_name=name)
        result = pk.set_peft_model_state_dict(ours, state, adapter_name=name)
        assert not result.missing_keys and not result.unexpected_keys
    hf.set_adapter(names[0])
    ours.set_adapter(names[0])
    return base.eval(), hf.eval(), ours.eval()


def single_rows(model: nn.Module, inputs: dict, names: list[str]) -> torch.Tensor:
    """Each row run alone with its own adapter: what a mixed batch must reproduce."""
    (key, x), = inputs.items()
    active = model.active_adapters
    rows = []
    for i, name in enumerate(names):
        model.set_adapter(name)
        rows.append(run(model, {key: x[i : i + 1]}))
    model.set_adapter(active)
    model.eval()
    return torch.cat(rows)


# ---- 1. stacks follow replaced storage ------------------------------------------------------------
STACKED = {n: dict(r=r, lora_alpha=2 * r, target_modules=["lin0", "lin1", "lin2"], init_lora_weights=False)
           for n, r in (("a", 2), ("b", 4), ("c", 3))}
ROWS = ["a", "b", "c", "b"]


def _replace_data(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if "lora_" in name and ".b." in name:
            p.data = p.data * -2.0 + 0.1  # a new storage, the Parameter object kept


def _assign_state_dict(model: nn.Module) -> None:
    state = {k: (v * 1.5 if "lora_" in k else v).clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new Parameter objects in place of the stacked ones


REPLACEMENTS = {"data": _replace_data, "assign": _assign_state_dict}


@pytest.mark.parametrize("kernel", ["bmm", "concat", "slots", "grouped"])
@pytest.mark.parametrize("replace", sorted(REPLACEMENTS))
def test_mixed_stacks_follow_replaced_storage(kernel, replace, monkeypatch):
    monkeypatch.setattr(mixed, "strategy", kernel)
    _, _, ours = lora_pair("mlp", STACKED)
    inputs = make_inputs("mlp")
    before = run(ours, {**inputs, "adapter_names": ROWS})  # builds every layer's stack
    torch.testing.assert_close(before, single_rows(ours, inputs, ROWS), atol=1e-5, rtol=0)
    REPLACEMENTS[replace](ours)
    after = run(ours, {**inputs, "adapter_names": ROWS})
    want = single_rows(ours, inputs, ROWS)
    assert not torch.allclose(want, before, atol=1e-3), "the replacement changed no adapter (test is void)"
    torch.testing.assert_close(after, want, atol=1e-5, rtol=1e-5)


def test_mixed_stacks_survive_storage_address_reuse(monkeypatch):
    """``p.data = new`` keeps the version counter, and once the stacked storage is freed the
    allocator may hand its address to a later one: an unchanged ``data_ptr`` must not pass for an
    unchanged tensor. (Best effort: whether the allocator reuses an address is its own business,
    so this catches a stack that stops pinning old storages only when reuse happens.)"""
    monkeypatch.setattr(mixed, "strategy", "bmm")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)).eval()
    ours = pk.get_peft_model(base, pk.LoraConfig(r=16, target_modules=["0", "2"], init_lora_weights=False), adapter_name="a")
    ours.add_adapter("b", pk.LoraConfig(r=8, target_modules=["0", "2"], init_lora_weights=False))
    ours.eval()
    rows, inputs = ["a", "b", "a"], {"input": torch.randn(3, 64)}
    before = run(ours, {**inputs, "adapter_names": rows})  # builds the stacks
    for name, p in ours.named_parameters():
        if "lora_A.a." in name:
            original = p.data_ptr()
            for _ in range(64):  # new values each time; stop once an address comes back
                p.data = torch.randn_like(p)
                if p.data_ptr() == original:
                    break
    want = single_rows(ours, inputs, rows)
    assert not torch.allclose(want, before, atol=1e-3)
    torch.testing.assert_close(run(ours, {**inputs, "adapter_names": rows}), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["bmm", "concat", "slots", "grouped"])
def test_mixed_stacks_follow_dtype_changes(kernel, monkeypatch):
    """``.to(float64)`` replaces every storage: the stacks must be rebuilt in float64 (a stale
    float32 stack would still give float32-accurate rows, so the tolerance is float64's)."""
    monkeypatch.setattr(mixed, "strategy", kernel)
    _, _, ours = lora_pair("mlp", STACKED)
    inputs = make_inputs("mlp")
    run(ours, {**inputs, "adapter_names": ROWS})
    ours.to(torch.float64)
    inputs64 = {"x": inputs["x"].double()}
    got = run(ours, {**inputs64, "adapter_names": ROWS})
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, single_rows(ours, inputs64, ROWS), atol=1e-12, rtol=0)
    ours.to(torch.float32)  # and back: new storages again (possibly at the first ones' addresses)
    got = run(ours, {**inputs, "adapter_names": ROWS})
    torch.testing.assert_close(got, single_rows(ours, inputs, ROWS), atol=1e-5, rtol=0)


# ---- 2. DoRA merge -> unmerge restores the base weight ---------------------------------------------
DORA_KINDS = {
    "mlp": ["lin0", "lin1"],
    "gpt2-conv1d": ["c_fc", "c_proj"],
    "conv2d": ["conv0", "conv1"],
    "embedding": ["emb"],
}


@pytest.mark.parametrize("kind", sorted(DORA_KINDS))
def test_dora_unmerge_restores_base_weight(kind):
    config = dict(r=4, lora_alpha=8, target_modules=DORA_KINDS[kind], use_dora=True, init_lora_weights=False)
    base, _, ours = lora_pair(kind, {"default": config})  # magnitudes perturbed: factor != 1
    inputs = make_inputs(kind)
    originals = {path: layer.base_layer.weight.detach().clone() for path, layer in adapter_layers(ours)}
    assert originals
    adapted = run(ours, inputs)
    ours.merge_adapter()
    for path, layer in adapter_layers(ours):
        assert not torch.allclose(layer.base_layer.weight, originals[path], atol=1e-4), f"{path}: merge changed nothing"
    torch.testing.assert_close(run(ours, inputs), adapted, atol=1e-4, rtol=0)
    ours.unmerge_adapter()
    for path, layer in adapter_layers(ours):
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, originals[path], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, path=path: f"{path}: base weight not restored by unmerge: {m}")
    torch.testing.assert_close(run(ours, inputs), adapted, atol=1e-4, rtol=0)
    with ours.disable_adapter():
        torch.testing.assert_close(run(ours, inputs), run(base, inputs), atol=1e-5, rtol=0)


# ---- 3. disable_adapter() on a merged model -----------------------------------------------------------
MLP_TWO = {
    "a": dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=False),
    "b": dict(r=2, lora_alpha=4, target_modules=["lin1", "lin2"], init_lora_weights=False),
}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_disable_adapter_on_merged_model_gives_base(use_dora):
    configs = {n: {**c, "use_dora": use_dora} for n, c in MLP_TWO.items()}
    base, hf, ours = lora_pair("mlp", configs)
    inputs = make_inputs("mlp")
    want_base = run(base, inputs)
    adapted = run(ours, inputs)
    torch.testing.assert_close(adapted, run(hf, inputs), atol=1e-5, rtol=0)
    hf.merge_adapter()
    ours.merge_adapter()
    with hf.disable_adapter():
        hf_disabled = run(hf, inputs)
    with ours.disable_adapter():
        ours_disabled = run(ours, inputs)
    torch.testing.assert_close(hf_disabled, want_base, atol=1e-5, rtol=0)  # HF's behaviour, checked
    torch.testing.assert_close(ours_disabled, want_base, atol=1e-5, rtol=0)
    # after the block HF's layers are unmerged (the disabled forward unmerged them) and adapt again
    hf_after, ours_after = run(hf, inputs), run(ours, inputs)
    torch.testing.assert_close(ours_after, hf_after, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_after, adapted, atol=1e-4, rtol=0)
    hf_merged = sorted(n for n, m in hf.named_modules() if getattr(m, "merged", False) and hasattr(m, "lora_A"))
    ours_merged = sorted(n for n, m in ours.named_modules() if getattr(m, "merged", False) and hasattr(m, "lora_A"))
    assert ours_merged == hf_merged


# ---- 4. merging twice -------------------------------------------------------------------------------
def test_merge_adapter_twice_merges_once():
    base, hf, ours = lora_pair("mlp", MLP_TWO)
    inputs = make_inputs("mlp")
    adapted = run(ours, inputs)
    originals = {path: layer.base_layer.weight.detach().clone() for path, layer in adapter_layers(ours)}
    for model in (hf, ours):
        model.merge_adapter()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do") as hf_record:
        hf.merge_adapter()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        ours.merge_adapter()
    assert hf_record  # HF's warning, as our message copies it
    torch.testing.assert_close(run(ours, inputs), run(hf, inputs), atol=1e-5, rtol=0)
    torch.testing.assert_close(run(ours, inputs), adapted, atol=1e-4, rtol=0)
    # merging one more adapter on top: HF names what was merged and what is added
    with pytest.warns(UserWarning, match="Already following adapters were merged a. You are now additionally merging b"):
        ours.merge_adapter(["a", "b"])
    with pytest.warns(UserWarning, match="Already following adapters were merged a. You are now additionally merging b"):
        hf.merge_adapter(["a", "b"])
    torch.testing.assert_close(run(ours, inputs), run(hf, inputs), atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    for path, layer in adapter_layers(ours):
        torch.testing.assert_close(layer.base_layer.weight, originals[path], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(ours, inputs), adapted, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.merge_adapter()  # nothing merged any more: no warning


def test_merge_and_unload_after_merge_adapter_merges_once():
    base, hf, ours = lora_pair("mlp", MLP_TWO)
    inputs = make_inputs("mlp")
    ours.merge_adapter()
    hf.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        merged = ours.merge_and_unload()
    with pytest.warns(UserWarning, match="already merged"):
        hf_merged = hf.merge_and_unload()
    torch.testing.assert_close(run(merged, inputs), run(hf_merged, inputs), atol=1e-5, rtol=0)


# ---- 5. modules_to_save with several adapters --------------------------------------------------------
SAVED = {
    "a": dict(r=2, target_modules=["lin0"], modules_to_save=["lin2"]),
    "b": dict(r=4, target_modules=["lin0", "lin1"], modules_to_save=["lin2"]),
    "c": dict(r=3, target_modules=["lin1"], modules_to_save=["lin2"]),
}


def _trainable(model: nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_only_the_active_adapters_modules_to_save_train():
    base = make_model("mlp")
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**SAVED["a"]), adapter_name="a")
    ours = pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(**SAVED["a"]), adapter_name="a")
    assert _trainable(ours) == _trainable(hf)
    for name in ("b", "c"):
        hf.add_adapter(name, peft.LoraConfig(**SAVED[name]))
        ours.add_adapter(name, pk.LoraConfig(**SAVED[name]))
        assert _trainable(ours) == _trainable(hf), f"after add_adapter({name!r})"
    for name in ("b", "a", "c", "b"):
        hf.set_adapter(name)
        ours.set_adapter(name)
        trainable = _trainable(ours)
        assert trainable == _trainable(hf), f"after set_adapter({name!r})"
        assert ours.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
        saved = [n for n in trainable if ".modules_to_save." in n]
        assert saved and all(f".modules_to_save.{name}." in n for n in saved), saved


# ---- 6. rank_pattern / alpha_pattern keys ------------------------------------------------------------
class PatternNet(nn.Module):
    """Names that tempt substring matching: ``lin1`` / ``lin10``, ``proj`` / ``q_proj``, ``sub.lin1``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(8, 8)
        self.lin10 = nn.Linear(8, 8)
        self.q_proj = nn.Linear(8, 8)
        self.proj = nn.Linear(8, 8)
        self.sub = nn.Module()
        self.sub.lin1 = nn.Linear(8, 8)
        self.sub.xlin1 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.lin1, self.lin10, self.q_proj, self.proj, self.sub.lin1, self.sub.xlin1):
            x = torch.tanh(layer(x))
        return x


PATTERN_TARGETS = ["lin1", "lin10", "q_proj", "proj", "xlin1"]
PATTERNS = [
    dict(rank_pattern={"lin1": 2, "proj": 3}, alpha_pattern={"lin10": 32, "proj": 5}),
    # the first matching key wins, in the dict's order
    dict(rank_pattern={"sub.lin1": 5, "lin1": 2, "lin.*": 6}, alpha_pattern={"q_proj": 7, "lin1": 3}),
    dict(rank_pattern={"lin1": 2, "sub.lin1": 5}, alpha_pattern={"in1": 9, "roj": 11}),  # substrings only
    dict(rank_pattern={"lin1|proj": 6, "^lin10": 7, "sub\\..*": 3}, alpha_pattern={"(q_)?proj": 12}),
]


@pytest.mark.parametrize("patterns", PATTERNS, ids=lambda p: "-".join(p["rank_pattern"]))
def test_rank_and_alpha_patterns_match_as_hf(patterns):
    config = dict(r=4, lora_alpha=8, target_modules=PATTERN_TARGETS, init_lora_weights=False, **patterns)
    torch.manual_seed(0)
    base = PatternNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF warns about keys that match nothing
        hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(**config))
    hf_layers = {n: m for n, m in hf.named_modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")}
    ours_layers = dict(adapter_layers(ours))
    assert sorted(ours_layers) == sorted(hf_layers)
    for name, layer in ours_layers.items():
        assert (layer.r["default"], layer.scaling["default"]) == (
            hf_layers[name].r["default"], hf_layers[name].scaling["default"]), name
    perturb(hf, seed=3)
    pk.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(hf))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(run(ours.eval(), {"x": x}), run(hf.eval(), {"x": x}), atol=1e-5, rtol=0)


# ---- 8. the fast mixed path in training mode with dropout ----------------------------------------------
DROPOUT = {n: dict(r=r, lora_alpha=2 * r, target_modules=["lin0", "lin1", "lin2"], lora_dropout=0.5,
                   init_lora_weights=False) for n, r in (("a", 2), ("b", 4))}
DROP_ROWS = ["a", "b", "b", "a"]


def _train_layers(model: nn.Module) -> None:
    """The layers in training mode (dropout on) while the PeftModel itself, which refuses
    ``adapter_names`` in training mode, stays in eval mode."""
    model.eval()
    model.base_model.model.train()


@pytest.mark.parametrize("kernel", ["auto", "bmm", "concat", "slots", "grouped"])
@pytest.mark.parametrize("frozen", ["requires_grad-false", "no_grad"])
def test_fast_mixed_path_with_dropout_equals_generic_path(kernel, frozen, monkeypatch):
    _, _, ours = lora_pair("mlp", DROPOUT)
    inputs = make_inputs("mlp")
    if frozen == "requires_grad-false":
        for p in ours.parameters():
            p.requires_grad_(False)
    eval_rows = run(ours, {**inputs, "adapter_names": DROP_ROWS})
    _train_layers(ours)

    def forward(strategy: str) -> torch.Tensor:
        monkeypatch.setattr(mixed, "strategy", strategy)
        torch.manual_seed(1234)
        if frozen == "no_grad":
            with torch.no_grad():
                return output_tensor(ours(**inputs, adapter_names=DROP_ROWS))
        return output_tensor(ours(**inputs, adapter_names=DROP_ROWS)).detach()

    generic = forward("loop")
    assert not torch.allclose(generic, eval_rows, atol=1e-3), "dropout had no effect (test is void)"
    torch.testing.assert_close(forward(kernel), generic, atol=1e-6, rtol=0)


# ---- 9. LoRA on an nn.Embedding with padding_idx ---------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_embedding_padding_idx_gradients_equal_hf(use_dora):
    config = dict(r=4, lora_alpha=8, target_modules=["emb", "lin"], init_lora_weights=False, use_dora=use_dora)
    _, hf, ours = lora_pair("embedding", {"default": config})
    assert hf.base_model.model.emb.base_layer.padding_idx == 0
    x = torch.tensor([[0, 3, 0, 7, 1, 0, 2], [5, 0, 0, 9, 0, 4, 4]])  # padding token 0 in both rows
    grads = []
    for model in (hf, ours):
        model.train()
        model.zero_grad()
        model(x).square().sum().backward()
        # HF keeps DoRA's magnitude in a module (``...default.weight``), we in a ParameterDict
        grads.append({n.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default"): p.grad
                      for n, p in model.named_parameters() if p.requires_grad})
    hf_grads, ours_grads = grads
    assert sorted(ours_grads) == sorted(hf_grads)
    for name, grad in hf_grads.items():
        assert ours_grads[name] is not None, name
        torch.testing.assert_close(ours_grads[name], grad, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    grad_a = ours_grads["base_model.model.emb.lora_embedding_A.default"]
    assert grad_a[:, 0].abs().max() == 0  # the padding token's column gets no gradient
    assert grad_a[:, 3].abs().max() > 0
