"""The mixed-batch stacks *are* the adapters' storage (``peft_kernel_lowrank.mixed.Stack``): after a
mixed batch each stacked LoRA parameter is a view of its layer's stack, nothing is held twice, and
everything that reads, saves or changes adapters still works (fp32, 1e-5 against HF PEFT and against
each row run alone). No timing here: see benchmarks/."""

from __future__ import annotations

import copy
import gc
from pathlib import Path

import pytest
import torch

from peft_kernel_lowrank import mixed

peft = pytest.importorskip("peft")
from test_mixed_fast import ADAPTERS, ALL, build, copy_adapter, ids, logits, single_rows  # noqa: E402

import peft_kernel as pk  # noqa: E402
from peft_kernel.layer import adapter_layers  # noqa: E402

ATOL = 1e-5
NAMES = ["a", "b", "c", "__base__", "d", "e", "a"]


def check(hf, ours, names, seq=5, seed=0):
    x = ids(len(names), seq, seed)
    got = logits(ours, x, adapter_names=names)
    if hf is not None:
        torch.testing.assert_close(got, logits(hf, x, adapter_names=names), atol=ATOL, rtol=0)
    torch.testing.assert_close(got, single_rows(ours, x, names), atol=ATOL, rtol=0)
    return got


def stacks(model) -> list[mixed.Stack]:
    return [s for _, layer in adapter_layers(model) if isinstance(s := layer.__dict__.get("_low_rank_stack"), mixed.Stack)]


def stack_storages(model) -> set[int]:
    return {t.untyped_storage().data_ptr() for s in stacks(model) for t in (s.A, s.Bt, s.bias) if t is not None}


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def adopted(model) -> dict[str, bool]:
    """Per LoRA parameter: is it a view of a stack?"""
    storages = stack_storages(model)
    return {n: p.untyped_storage().data_ptr() in storages for n, p in lora_params(model).items()}


def param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def resident(model) -> int:
    from benchmarks.memory import resident_bytes

    return resident_bytes(model)


@pytest.fixture(params=["auto", "bmm", "concat", "slots", "grouped"])
def kernel(request, monkeypatch):
    monkeypatch.setattr(mixed, "strategy", request.param)
    return request.param


def test_parameters_become_the_stack_and_outputs_do_not_change(kernel):
    """Different ranks (padding), rsLoRA, rank/alpha patterns, lora_bias: every plain LoRA parameter
    is adopted, and outputs before and after adoption equal HF's and each row's single run."""
    hf, ours = build(ADAPTERS)
    x = ids(len(NAMES), 5)
    single = single_rows(ours, x, NAMES)  # before any stack exists
    assert not stacks(ours)
    before = {n: p.detach().clone() for n, p in lora_params(ours).items()}
    requires = {n: p.requires_grad for n, p in lora_params(ours).items()}
    got = check(hf, ours, NAMES)
    torch.testing.assert_close(got, single, atol=ATOL, rtol=0)
    assert all(adopted(ours).values())
    for n, p in lora_params(ours).items():
        assert torch.equal(p, before[n]) and p.requires_grad == requires[n]
    for _, layer in adapter_layers(ours):  # each slot's rank padding is zero
        s = layer.__dict__["_low_rank_stack"]
        for i, name in enumerate(s.names):
            r = layer.lora_A[name].weight.shape[0]
            assert not s.A[i, r:].any() and not s.Bt[i, r:].any()
    check(hf, ours, NAMES, seq=1, seed=1)  # decode-sized batch
    for name in ADAPTERS:  # single-adapter path on the views
        hf.set_adapter(name)
        ours.set_adapter(name)
        torch.testing.assert_close(logits(ours, x), logits(hf, x), atol=ATOL, rtol=0)


def test_resident_bytes_are_the_parameters_bytes(monkeypatch):
    """No second copy: after mixed batches (every kernel) the model holds its parameters' bytes only."""
    hf, ours = build({f"n{i}": dict(r=4, lora_alpha=8 + i % 2, target_modules=ALL) for i in range(6)})
    expected = param_bytes(ours)
    assert resident(ours) == expected
    for strategy in ("bmm", "concat", "slots", "grouped"):
        monkeypatch.setattr(mixed, "strategy", strategy)
        check(hf, ours, ["n0", "n3", "__base__", "n5", "n1"])
    assert stacks(ours) and all(adopted(ours).values())
    assert resident(ours) == expected == param_bytes(ours)


def test_layers_that_cannot_be_stacked_are_left_alone():
    """DoRA adapters are never adopted; adapters of another dtype in the layer: no stack at all."""
    adapters = {
        "plain": dict(r=4, lora_alpha=8, target_modules=ALL),
        "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    }
    hf, ours = build(adapters)
    check(None, ours, ["dora", "plain", "__base__", "dora"])
    flags = adopted(ours)
    assert all(v for n, v in flags.items() if ".plain." in n)
    assert not any(v for n, v in flags.items() if ".dora." in n)
    _, ours = build({"a": ADAPTERS["a"], "b": dict(r=4, lora_alpha=8, target_modules=["q_proj"])})
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_A["b"].double()
    layer.lora_B["b"].double()
    x = ids(2)
    got = logits(ours, x, adapter_names=["a", "b"])
    torch.testing.assert_close(got, single_rows(ours, x, ["a", "b"]), atol=ATOL, rtol=0)
    assert "_low_rank_stack" not in layer.__dict__
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in lora_params(layer).values())


def test_saving_after_adoption(tmp_path: Path):
    hf, ours = build({k: ADAPTERS[k] for k in ("a", "c", "d")})
    check(hf, ours, ["a", "c", "d"])
    assert all(adopted(ours).values())
    storages = stack_storages(ours)
    # get_peft_model_state_dict: contiguous copies, sharing nothing with the stacks or each other
    for name in ("a", "c", "d"):
        state = pk.get_peft_model_state_dict(ours, adapter_name=name)
        ptrs = {t.untyped_storage().data_ptr() for t in state.values()}
        assert len(ptrs) == len(state) and not ptrs & storages
        assert all(t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
                   for t in state.values())
        hf_state = peft.get_peft_model_state_dict(hf, adapter_name=name)
        assert state.keys() == hf_state.keys()
        for key in state:
            torch.testing.assert_close(state[key], hf_state[key], atol=0, rtol=0)
    # save_pretrained (safetensors and pickle): HF and a fresh model of ours load equal outputs
    for safe in (True, False):
        folder = tmp_path / f"safe{safe}"
        ours.save_pretrained(folder, safe_serialization=safe)
        loaded_hf, loaded_ours = build({k: ADAPTERS[k] for k in ("a",)})
        for name in ("c", "d"):
            loaded_hf.load_adapter(folder / name, adapter_name=name)
            loaded_ours.load_adapter(folder / name, adapter_name=name, allow_pickle=not safe)
        x = ids(3, seed=2)
        torch.testing.assert_close(logits(loaded_ours, x, adapter_names=["c", "d", "c"]),
                                   logits(ours, x, adapter_names=["c", "d", "c"]), atol=ATOL, rtol=0)
        torch.testing.assert_close(logits(loaded_hf, x, adapter_names=["c", "d", "c"]),
                                   logits(ours, x, adapter_names=["c", "d", "c"]), atol=ATOL, rtol=0)
    # torch.save(model.state_dict()) round trip into a model that never ran a mixed batch
    torch.save(ours.state_dict(), tmp_path / "full.pt")
    _, fresh = build({k: ADAPTERS[k] for k in ("a", "c", "d")})
    fresh.load_state_dict(torch.load(tmp_path / "full.pt"))
    x = ids(3, seed=3)
    torch.testing.assert_close(logits(fresh, x, adapter_names=["d", "a", "c"]),
                               logits(ours, x, adapter_names=["d", "a", "c"]), atol=0, rtol=0)


def test_training_through_adopted_parameters(monkeypatch):
    """Optimizer steps through mixed batches (eval mode, autograd on) and single-adapter batches
    (training mode) reach the parameters (views) and the stack follows: the result equals the same
    training on the plain path (no stacks: ``loop``), and HF PEFT loaded with the trained weights
    gives the same mixed batch."""
    hf, ours = build({k: ADAPTERS[k] for k in ("a", "b", "c")})
    plain = copy.deepcopy(ours)
    check(hf, ours, ["a", "b", "c"])  # adopt
    opts = []
    for model in (ours, plain):
        model.train()
        params = list(lora_params(model).values())
        for p in params:
            p.requires_grad_(True)
        opts.append(torch.optim.SGD(params, lr=0.5, momentum=0.5))
    for step in range(3):
        x = ids(3, seed=10 + step)
        for model, opt, strategy in zip((ours, plain), opts, ("auto", "loop")):
            monkeypatch.setattr(mixed, "strategy", strategy)
            opt.zero_grad()
            if step == 1:
                model.train()
                model.set_adapter("b")
                model(input_ids=x).logits.square().mean().backward()
                model.set_adapter("a")
            else:
                model.eval()
                model(input_ids=x, adapter_names=["a", "b", "c"]).logits.square().mean().backward()
            opt.step()
        for (n, p), q in zip(lora_params(ours).items(), lora_params(plain).values()):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=0, msg=n)
    monkeypatch.setattr(mixed, "strategy", "auto")
    assert not stacks(plain) and stacks(ours) and all(adopted(ours).values())
    for (n, p), q in zip(lora_params(ours).items(), lora_params(plain).values()):
        torch.testing.assert_close(p, q, atol=ATOL, rtol=0, msg=n)
    ours.eval()
    for name in ("a", "b", "c"):
        peft.set_peft_model_state_dict(hf, pk.get_peft_model_state_dict(ours, adapter_name=name), adapter_name=name)
    check(hf, ours, ["c", "a", "b", "__base__"], seed=4)


def test_loads_write_into_the_stack_and_assign_replaces():
    hf, ours = build({k: ADAPTERS[k] for k in ("a", "b")})
    check(hf, ours, ["a", "b"])
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if ".b." in n:
                p.mul_(-2.0)
    copy_adapter(hf, ours, "b")  # set_peft_model_state_dict: copy_ into the views
    assert all(adopted(ours).values())
    check(hf, ours, ["a", "b"], seed=1)
    # load_state_dict(assign=True): new Parameter objects, adopted by the next mixed batch
    state = {k: v.clone() * 0.5 for k, v in ours.state_dict().items() if ".a." in k and "lora_" in k}
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if ".a." in n and "lora_" in n:
                p.mul_(0.5)
    ours.load_state_dict(state, strict=False, assign=True)
    check(hf, ours, ["b", "a"], seed=2)
    assert all(adopted(ours).values())


def test_add_and_delete_grow_shrink_and_free():
    hf, ours = build({k: ADAPTERS[k] for k in ("a", "b")})
    check(hf, ours, ["a", "b"])
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    old = layer.__dict__["_low_rank_stack"].A.untyped_storage()._weak_ref()
    config = dict(r=5, lora_alpha=3, target_modules=["q_proj", "down_proj"])
    hf.add_adapter("new", peft.LoraConfig(init_lora_weights=False, **config))
    ours.add_adapter("new", pk.LoraConfig(init_lora_weights=False, **config))
    copy_adapter(hf, ours, "new")
    check(hf, ours, ["new", "a", "b"], seed=1)
    assert layer.__dict__["_low_rank_stack"].names == ("a", "b", "new") and all(adopted(ours).values())
    gc.collect()
    assert torch.UntypedStorage._expired(old)  # the grown stack replaced the old one
    current = layer.__dict__["_low_rank_stack"].A.untyped_storage()._weak_ref()
    hf.delete_adapter("b")
    ours.delete_adapter("b")
    gc.collect()
    assert torch.UntypedStorage._expired(current)  # the deleted adapter's memory is gone
    assert resident(ours) == param_bytes(ours)
    check(hf, ours, ["new", "a", "__base__"], seed=2)
    assert layer.__dict__["_low_rank_stack"].names == ("a", "new") and all(adopted(ours).values())


def test_hotswap_and_compiled_hotswap_preparation(tmp_path: Path):
    hf, ours = build({k: ADAPTERS[k] for k in ("a", "d")})
    other_hf, _ = build({"x": dict(r=2, lora_alpha=3, target_modules=ALL)})
    other_hf.save_pretrained(tmp_path, selected_adapters=["x"])
    check(hf, ours, ["a", "d"])
    pk.prepare_model_for_compiled_hotswap(ours, target_rank=8)  # pad_rank: new tensors, re-adopted
    check(None, ours, ["a", "d"], seed=1)
    assert all(adopted(ours).values())
    pk.hotswap_adapter(ours, tmp_path / "x", adapter_name="a")
    hf.load_adapter(tmp_path / "x", adapter_name="x")  # HF: the swapped-in weights as their own adapter
    assert all(adopted(ours).values())
    x = ids(3, seed=2)
    got = logits(ours, x, adapter_names=["a", "d", "__base__"])
    torch.testing.assert_close(got, logits(hf, x, adapter_names=["x", "d", "__base__"]), atol=ATOL, rtol=0)
    torch.testing.assert_close(got, single_rows(ours, x, ["a", "d", "__base__"]), atol=ATOL, rtol=0)


def test_merge_and_unload_leave_no_views():
    hf, ours = build({k: ADAPTERS[k] for k in ("a", "b")})
    check(hf, ours, ["a", "b"])
    x = ids(2, seed=5)
    for model in (hf, ours):
        model.set_adapter("a")
        model.merge_adapter()
    torch.testing.assert_close(logits(ours, x), logits(hf, x), atol=ATOL, rtol=0)
    for model in (hf, ours):
        model.unmerge_adapter()
    check(hf, ours, ["b", "a"], seed=6)
    storages = stack_storages(ours)
    merged = ours.merge_and_unload()
    want = hf.merge_and_unload()
    torch.testing.assert_close(logits(merged, x), logits(want, x), atol=ATOL, rtol=0)
    assert not {p.untyped_storage().data_ptr() for p in merged.parameters()} & storages
    _, ours = build({k: ADAPTERS[k] for k in ("a", "b")})
    check(None, ours, ["a", "b"])
    storages = stack_storages(ours)
    base = ours.unload()
    assert not {p.untyped_storage().data_ptr() for p in base.parameters()} & storages


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_dtype_moves_rebuild_and_readopt(dtype):
    hf, ours = build({k: ADAPTERS[k] for k in ("a", "b", "c")})
    names = ["a", "b", "c", "__base__"]
    check(hf, ours, names)
    ours.to(dtype)
    assert not any(adopted(ours).values())  # the moved parameters are no views any more
    x = ids(len(names), 4, seed=1)
    got = logits(ours, x, adapter_names=names)
    assert got.dtype == dtype and all(adopted(ours).values())
    tol = ATOL if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(got, single_rows(ours, x, names), atol=tol, rtol=0)
    if dtype == torch.float64:
        hf.double()
        torch.testing.assert_close(got, logits(hf, x, adapter_names=names), atol=ATOL, rtol=0)
    padding = 0  # these adapters' ranks differ: the stacks' rank padding is all they add
    for _, layer in adapter_layers(ours):
        s = layer.__dict__["_low_rank_stack"]
        padding += sum(s.r - layer.r[n] for n in s.names) * (s.A.shape[2] + s.Bt.shape[2]) * s.A.element_size()
        if s.bias is not None:  # the rows of adapters without a bias
            padding += sum(layer.lora_B[n].bias is None for n in s.names) * s.bias[0].nbytes
    assert resident(ours) == param_bytes(ours) + padding  # the float32 stacks are gone


def test_deepcopy_is_independent():
    hf, ours = build({k: ADAPTERS[k] for k in ("a", "b")})
    check(hf, ours, ["a", "b"])
    twin = copy.deepcopy(ours)
    assert not stacks(twin)
    ours_ptrs = {p.untyped_storage().data_ptr() for p in ours.parameters()}
    assert not {p.untyped_storage().data_ptr() for p in twin.parameters()} & ours_ptrs
    x = ids(3, seed=1)
    want = logits(ours, x, adapter_names=["b", "a", "__base__"])
    torch.testing.assert_close(logits(twin, x, adapter_names=["b", "a", "__base__"]), want, atol=0, rtol=0)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_B" in n:
                p.zero_()
    torch.testing.assert_close(logits(ours, x, adapter_names=["b", "a", "__base__"]), want, atol=0, rtol=0)
    with ours.disable_adapter():
        base = logits(ours, x)
    torch.testing.assert_close(logits(twin, x, adapter_names=["b", "a", "__base__"]), base, atol=ATOL, rtol=0)


def test_alora_is_unaffected():
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6])
    hf, ours = build({"a": ADAPTERS["a"], "al": config})
    x = ids(2, 8, seed=3)
    x[:, 3:5] = torch.tensor([5, 6])
    got = logits(ours, x, adapter_names=["al", "a"])
    torch.testing.assert_close(got, single_rows(ours, x, ["al", "a"]), atol=ATOL, rtol=0)
    assert not any(v for n, v in adopted(ours).items() if ".al." in n)


def test_compiled_path_reads_the_adopted_stacks_without_recompiling():
    """Under ``torch.compile`` the graph reads the stacks the parameters live in: an in-place write
    to a parameter (an optimizer step, a load) is seen by the next compiled call, with no recompile."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    try:
        hf, ours = build({k: ADAPTERS[k] for k in ("a", "b", "d")})
        counter = CompileCounter()
        compiled = torch.compile(ours, backend=counter)
        names = ["a", "d", "__base__", "b"]
        x = ids(4, seed=8)
        torch.testing.assert_close(logits(compiled, x, adapter_names=names), logits(hf, x, adapter_names=names),
                                   atol=ATOL, rtol=0)
        assert all(adopted(ours).values())
        frames = counter.frame_count
        with torch.no_grad():
            for model in (hf, ours):
                for n, p in model.named_parameters():
                    if ".d." in n:
                        p.mul_(-1.5)
        torch.testing.assert_close(logits(compiled, x, adapter_names=names), logits(hf, x, adapter_names=names),
                                   atol=ATOL, rtol=0)
        assert counter.frame_count == frames and all(adopted(ours).values())
    finally:
        torch._dynamo.reset()
