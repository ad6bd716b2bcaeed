"""``torch.compile`` of a PeftModel: outputs equal eager and HF PEFT, and switching adapters
(``adapter_names``, ``set_adapter``, ``hotswap_adapter``, a lower-rank adapter after
``prepare_model_for_compiled_hotswap``) does not recompile (``peft_kernel.compiled``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import peft_kernel as pk
from peft_kernel_testing.models import make_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = [["x", "y", "z", "x"], ["z", "z", "x", "y"], ["y", "__base__", "x", "z"], ["x", "x", "x", "x"]]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _config(lib, r: int = 4, alpha: int = 8, **kw):
    return lib.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False, **kw)


def _models(ranks=(4, 2, 6)):
    """(HF, ours) on the tiny Llama with adapters x, y, z of ``ranks``; ours holds HF's weights."""
    peft = pytest.importorskip("peft")
    base = make_model("llama")
    hf = peft.get_peft_model(copy.deepcopy(base), _config(peft, ranks[0]), adapter_name="x")
    ours = pk.get_peft_model(copy.deepcopy(base), _config(pk, ranks[0]), adapter_name="x")
    for name, r in zip("yz", ranks[1:]):
        hf.add_adapter(name, _config(peft, r, alpha=3 * r))
        ours.add_adapter(name, _config(pk, r, alpha=3 * r))
    for name in "xyz":
        pk.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(hf, adapter_name=name), adapter_name=name)
    return hf.eval(), ours.eval()


def _ids(seed: int = 0, batch: int = 4, length: int = 5) -> torch.Tensor:
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def test_adapter_names_and_set_adapter_switch_without_recompiling():
    hf, ours = _models()
    cc = CompileCounter()
    compiled = torch.compile(ours, backend=cc)
    ids = _ids()
    _logits(compiled, ids)
    _logits(compiled, ids, adapter_names=ROWS[0])
    frames, graphs = cc.frame_count, counters["stats"]["unique_graphs"]
    assert frames > 0
    for names in ROWS:
        got = _logits(compiled, ids, adapter_names=names)
        torch.testing.assert_close(got, _logits(ours, ids, adapter_names=names), atol=1e-5, rtol=0)
        torch.testing.assert_close(got, _logits(hf, ids, adapter_names=names), atol=1e-5, rtol=0)
    for name in ("y", "z", "x"):
        ours.set_adapter(name)
        hf.set_adapter(name)
        got = _logits(compiled, ids)
        torch.testing.assert_close(got, _logits(hf, ids), atol=1e-5, rtol=0)
    assert (cc.frame_count, counters["stats"]["unique_graphs"]) == (frames, graphs)


def test_inductor_matches_eager_and_does_not_recompile():
    _, ours = _models()
    compiled = torch.compile(ours)  # CPU inductor; mixed batches only (each graph compiles for ~30 s here)
    ids = _ids(1)
    _logits(compiled, ids, adapter_names=ROWS[0])
    graphs = counters["stats"]["unique_graphs"]
    for names in ROWS[1:]:
        torch.testing.assert_close(_logits(compiled, ids, adapter_names=names), _logits(ours, ids, adapter_names=names),
                                   atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs


def _saved(tmp_path, name: str, r: int, alpha: int, seed: int):
    """An adapter saved by HF PEFT and the HF model that holds it (the oracle)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    hf = peft.get_peft_model(make_model("llama"), _config(peft, r, alpha)).eval()
    hf.save_pretrained(tmp_path / name)
    return tmp_path / name, hf


def test_hotswap_same_rank_does_not_recompile(tmp_path):
    _, ours = _models(ranks=(4, 4, 4))
    path, oracle = _saved(tmp_path, "new", r=4, alpha=5, seed=7)
    cc = CompileCounter()
    compiled = torch.compile(ours, backend=cc)
    ids = _ids(2)
    _logits(compiled, ids)
    _logits(compiled, ids, adapter_names=ROWS[0])
    frames = cc.frame_count
    pk.hotswap_adapter(ours, str(path), adapter_name="x")
    torch.testing.assert_close(_logits(compiled, ids), _logits(oracle, ids), atol=1e-5, rtol=0)
    mixed = _logits(compiled, ids, adapter_names=ROWS[1])
    torch.testing.assert_close(mixed, _logits(ours, ids, adapter_names=ROWS[1]), atol=1e-5, rtol=0)
    assert cc.frame_count == frames


def test_prepared_model_hotswaps_lower_ranks_and_other_alphas_without_recompiling(tmp_path):
    from peft_kernel.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    assert pk.prepare_model_for_compiled_hotswap is prepare_model_for_compiled_hotswap
    _, ours = _models()
    ids = _ids(3)
    before = {n: _logits(ours, ids, adapter_names=[n] * 4) for n in "xyz"}
    config = copy.deepcopy(ours.peft_config["x"])
    prepare_model_for_compiled_hotswap(ours, target_rank=8, config=config)
    assert config.r == 8
    for n in "xyz":  # zero padding is exact
        torch.testing.assert_close(_logits(ours, ids, adapter_names=[n] * 4), before[n], atol=1e-6, rtol=0)
    cc = CompileCounter()
    compiled = torch.compile(ours, backend=cc)
    _logits(compiled, ids)
    _logits(compiled, ids, adapter_names=ROWS[0])
    frames = cc.frame_count
    for i, (r, alpha) in enumerate([(2, 3), (8, 16), (5, 1)]):
        path, oracle = _saved(tmp_path, f"x{i}", r=r, alpha=alpha, seed=10 + i)
        hotswap_adapter(compiled, str(path), adapter_name="x")
        torch.testing.assert_close(_logits(compiled, ids), _logits(oracle, ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(_logits(compiled, ids, adapter_names=ROWS[2]), _logits(ours, ids, adapter_names=ROWS[2]),
                                   atol=1e-5, rtol=0)
    assert cc.frame_count == frames


def test_prepare_errors_match_hf(tmp_path):
    from peft_kernel.utils.hotswap import prepare_model_for_compiled_hotswap

    _, ours = _models()
    with pytest.raises(ValueError, match="original rank is larger"):
        prepare_model_for_compiled_hotswap(ours, target_rank=3)
    with pytest.raises(ValueError, match="check_compiles should be one of"):
        prepare_model_for_compiled_hotswap(ours, target_rank=8, check_compiled="bad")
    with pytest.raises(ValueError, match="before"):
        prepare_model_for_compiled_hotswap(torch.compile(ours, backend="eager"), target_rank=8)
    with pytest.raises(ValueError, match="No adapter layers"):
        prepare_model_for_compiled_hotswap(make_model("llama"), target_rank=8)
    path, _ = _saved(tmp_path, "low", r=2, alpha=2, seed=3)
    with pytest.raises(pk.CheckpointError, match="prepare_model_for_compiled_hotswap"):
        pk.hotswap_adapter(ours, str(path), adapter_name="x")  # not prepared: ranks must be equal
    prepare_model_for_compiled_hotswap(ours, target_rank=6)
    big, _ = _saved(tmp_path, "big", r=7, alpha=2, seed=4)
    with pytest.raises(pk.CheckpointError, match="at most the prepared rank 6"):
        pk.hotswap_adapter(ours, str(big), adapter_name="x")


def test_layers_without_a_compiled_path_fall_back_to_eager():
    """A DoRA adapter has no stacked factors: the eager paths run (traced as they are), still exact."""
    peft = pytest.importorskip("peft")
    base = make_model("llama")
    hf = peft.get_peft_model(copy.deepcopy(base), _config(peft, use_dora=True), adapter_name="x").eval()
    ours = pk.get_peft_model(copy.deepcopy(base), _config(pk, use_dora=True), adapter_name="x").eval()
    pk.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(hf, adapter_name="x"), adapter_name="x")
    ids = _ids(4)
    got = _logits(torch.compile(ours, backend="eager"), ids)
    torch.testing.assert_close(got, _logits(hf, ids), atol=1e-5, rtol=0)


def test_modules_to_save_rows_stay_routed_under_compile():
    """``modules_to_save`` copies route rows through Python state: the eager paths serve them."""
    base = make_model("llama")
    ours = pk.get_peft_model(base, _config(pk, modules_to_save=["lm_head"]), adapter_name="x")
    ours.add_adapter("y", _config(pk, modules_to_save=["lm_head"]))
    with torch.no_grad():
        ours.base_model.model.lm_head.modules_to_save["y"].weight.mul_(2)
    ours.eval()
    ids = _ids(5)
    names = ["y", "x", "__base__", "y"]
    got = _logits(torch.compile(ours, backend="eager"), ids, adapter_names=names)
    torch.testing.assert_close(got, _logits(ours, ids, adapter_names=names), atol=1e-5, rtol=0)


def test_lora_bias_under_compile():
    base = make_model("llama")
    ours = pk.get_peft_model(base, _config(pk, lora_bias=True), adapter_name="x")
    ours.add_adapter("y", _config(pk, r=2, alpha=5, lora_bias=True))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                p.normal_()
    ours.eval()
    compiled = torch.compile(ours, backend=CompileCounter())
    ids = _ids(6)
    for names in (["y", "x", "__base__", "y"], None):
        kw = {} if names is None else {"adapter_names": names}
        torch.testing.assert_close(_logits(compiled, ids, **kw), _logits(ours, ids, **kw), atol=1e-5, rtol=0)
