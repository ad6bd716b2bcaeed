"""The fast LoRA paths (``peft_kernel_lowrank.mixed``) against HF ``peft`` and against single-adapter runs.

Every mixed-batch kernel (``bmm``, ``concat``, ``grouped``, the generic ``loop`` and ``auto``) must
give each row what its own adapter gives it alone, and what HF PEFT's mixed batch gives (fp32,
1e-4), including after the adapters change (stack invalidation). No timing here: see benchmarks/.
"""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import peft_kernel as pk  # noqa: E402
from peft_kernel_lowrank import mixed  # noqa: E402

ATOL = 1e-4
STRATEGIES = ["auto", "bmm", "concat", "slots", "grouped", "loop"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> LoraConfig kwargs (shared by HF and ours); ranks, alphas, targets, rsLoRA and bias differ
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=ALL),
    "b": dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
    "c": dict(r=2, lora_alpha=16, target_modules=ALL, lora_bias=True),
    "d": dict(r=6, lora_alpha=6, target_modules=["k_proj", "up_proj", "o_proj"],
              rank_pattern={"up_proj": 3}, alpha_pattern={"o_proj": 12}),
    "e": dict(r=4, lora_alpha=4, target_modules=ALL, layers_to_transform=[1]),
}


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=64, pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def build(adapters: dict[str, dict]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(HF model, our model) with the same adapters, all weights non-trivial (biases too)."""
    base = tiny_llama()
    names = list(adapters)
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **adapters[names[0]]),
                             adapter_name=names[0])
    ours = pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(init_lora_weights=False, **adapters[names[0]]),
                             adapter_name=names[0])
    for name in names[1:]:
        hf.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **adapters[name]))
        ours.add_adapter(name, pk.LoraConfig(init_lora_weights=False, **adapters[name]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, param in hf.named_parameters():
            if "lora_" in pname:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    for name in names:
        copy_adapter(hf, ours, name)
    return hf.eval(), ours.eval()


def copy_adapter(hf: torch.nn.Module, ours: torch.nn.Module, name: str) -> None:
    state = peft.get_peft_model_state_dict(hf, adapter_name=name)
    result = pk.set_peft_model_state_dict(ours, state, adapter_name=name)
    assert not result.missing_keys


@pytest.fixture(params=STRATEGIES)
def strategy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(mixed, "strategy", request.param)
    return request.param


@pytest.fixture(params=["bmm", "concat", "slots", "grouped"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The stacked kernels only (``auto`` picks among them; ``loop`` is the reference)."""
    monkeypatch.setattr(mixed, "strategy", request.param)
    return request.param


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    return build(ADAPTERS)


def ids(rows: int, seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 64, (rows, seq), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def single_rows(ours: torch.nn.Module, input_ids: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Each row run alone with its own adapter (the reference a mixed batch must reproduce)."""
    rows = []
    active = ours.active_adapters
    for i, name in enumerate(names):
        if name == "__base__":
            with ours.disable_adapter():
                rows.append(logits(ours, input_ids[i : i + 1]))
        else:
            ours.set_adapter(name)
            rows.append(logits(ours, input_ids[i : i + 1]))
    ours.set_adapter(active)
    ours.eval()
    return torch.cat(rows)


def check(hf: torch.nn.Module | None, ours: torch.nn.Module, names: list[str], seq: int = 7, seed: int = 0) -> None:
    x = ids(len(names), seq, seed)
    got = logits(ours, x, adapter_names=names)
    if hf is not None:
        torch.testing.assert_close(got, logits(hf, x, adapter_names=names), atol=ATOL, rtol=0)
    torch.testing.assert_close(got, single_rows(ours, x, names), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "names",
    [
        ["a", "b"],
        ["b", "a", "b", "a"],
        ["a", "b", "c", "d", "e"],
        ["e", "__base__", "c", "a", "__base__", "d", "b", "a", "c"],
        ["__base__", "__base__"],
        ["c", "c", "c"],
        ["d", "__base__", "d"],
    ],
)
def test_mixed_equals_hf_and_single_runs(models, strategy, names):
    hf, ours = models
    check(hf, ours, names)


def test_decode_shape_rows_of_one_token(models, strategy):
    hf, ours = models
    check(hf, ours, ["a", "b", "c", "d", "e", "__base__", "a", "c"], seq=1)


def test_adapters_make_a_difference(models, kernel):
    hf, ours = models
    x = ids(3)
    with ours.disable_adapter():
        base = logits(ours, x)
    got = logits(ours, x, adapter_names=["a", "__base__", "c"])
    assert not torch.allclose(got[0], base[0], atol=1e-3)
    torch.testing.assert_close(got[1], base[1], atol=ATOL, rtol=0)
    assert not torch.allclose(got[2], base[2], atol=1e-3)


def test_many_adapters_same_rank(strategy):
    adapters = {f"n{i}": dict(r=4, lora_alpha=8, target_modules=ALL) for i in range(12)}
    hf, ours = build(adapters)
    check(hf, ours, [f"n{i % 12}" for i in range(16)])
    check(hf, ours, [f"n{i % 12}" for i in range(16)], seq=1)


def test_single_adapter_forward_equals_hf(models):
    hf, ours = models
    x = ids(3)
    for name in ADAPTERS:
        hf.set_adapter(name)
        ours.set_adapter(name)
        torch.testing.assert_close(logits(ours, x), logits(hf, x), atol=ATOL, rtol=0)
    hf.base_model.set_adapter(["a", "c"])
    ours.set_adapter(["a", "c"])
    torch.testing.assert_close(logits(ours, x), logits(hf, x), atol=ATOL, rtol=0)
    hf.set_adapter("a")
    ours.set_adapter("a")
    hf.eval()
    ours.eval()


def test_dora_adapters_in_mixed_batches(strategy):
    adapters = {
        "plain": dict(r=4, lora_alpha=8, target_modules=ALL),
        "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True),
        "plain2": dict(r=8, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
    }
    hf, ours = build(adapters)
    # HF peft refuses adapter_names with DoRA: rows are checked against single-adapter runs, which
    # the LoRA conformance suite checks against HF
    check(None, ours, ["dora", "plain", "__base__", "plain2", "dora"])
    check(None, ours, ["dora", "dora"])
    x = ids(1)
    for name in adapters:
        hf.set_adapter(name)
        ours.set_adapter(name)
        torch.testing.assert_close(logits(ours, x), logits(hf, x), atol=ATOL, rtol=0)


def test_stacks_follow_adapter_changes(kernel, tmp_path):
    hf, ours = build({k: ADAPTERS[k] for k in ("a", "b", "c")})
    names = ["a", "b", "c", "__base__", "a"]
    check(hf, ours, names)

    # weights written in place (set_peft_model_state_dict / load): new values must be used
    with torch.no_grad():
        for pname, param in hf.named_parameters():
            if ".b." in pname:
                param.mul_(-1.5)
    copy_adapter(hf, ours, "b")
    check(hf, ours, names, seed=1)

    # an optimizer step on our weights (training mode, then eval again): HF gets the same change
    ours.set_adapter("a")
    ours.train()
    params = [p for n, p in ours.named_parameters() if p.requires_grad]
    assert params
    optimizer = torch.optim.SGD(params, lr=0.5)
    ours(input_ids=ids(2)).logits.square().mean().backward()
    optimizer.step()
    ours.eval()
    state = pk.get_peft_model_state_dict(ours, adapter_name="a")
    peft.set_peft_model_state_dict(hf, state, adapter_name="a")
    check(hf, ours, names, seed=2)

    # delete and add an adapter under a name used before
    hf.delete_adapter("c")
    ours.delete_adapter("c")
    check(hf, ours, ["a", "b", "__base__"], seed=3)
    config = dict(r=3, lora_alpha=5, target_modules=["q_proj", "gate_proj"])
    hf.add_adapter("c", peft.LoraConfig(init_lora_weights=False, **config))
    ours.add_adapter("c", pk.LoraConfig(init_lora_weights=False, **config))
    copy_adapter(hf, ours, "c")
    check(hf, ours, ["c", "a", "b", "c"], seed=4)

    # load a saved adapter, then hotswap new weights into it (copied in place: same tensors)
    hf.save_pretrained(tmp_path / "hf", selected_adapters=["a", "b"])
    ours.load_adapter(tmp_path / "hf" / "b", adapter_name="loaded")
    hf.load_adapter(tmp_path / "hf" / "b", adapter_name="loaded")
    check(hf, ours, ["loaded", "a", "b"], seed=5)
    with torch.no_grad():
        for pname, param in ours.named_parameters():
            if ".b." in pname:
                param.mul_(2.0)
    ours.save_pretrained(tmp_path / "ours", selected_adapters=["b"])
    x = ids(1, seed=7).repeat(2, 1)
    before = logits(ours, x, adapter_names=["loaded", "b"])  # builds stacks with the old "loaded"
    assert not torch.allclose(before[0], before[1], atol=1e-3)
    pk.hotswap_adapter(ours, tmp_path / "ours" / "b", adapter_name="loaded")
    got = logits(ours, x, adapter_names=["loaded", "b"])
    torch.testing.assert_close(got[0], got[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(got, single_rows(ours, x, ["loaded", "b"]), atol=ATOL, rtol=0)

    # rescaled adapters: the stacks fold the scaling in, so they must see the new one
    with pk.rescale_adapter_scale(ours, 0.5):
        halved = logits(ours, x, adapter_names=["a", "b"])
        torch.testing.assert_close(halved, single_rows(ours, x, ["a", "b"]), atol=ATOL, rtol=0)
    full = logits(ours, x, adapter_names=["a", "b"])
    assert not torch.allclose(full, halved, atol=1e-4)
    torch.testing.assert_close(full, single_rows(ours, x, ["a", "b"]), atol=ATOL, rtol=0)


def test_generate_with_adapter_names(models, kernel):
    hf, ours = models
    x = ids(4, seq=5, seed=3)
    names = ["a", "__base__", "c", "d"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = hf.generate(input_ids=x, adapter_names=names, **kwargs)
        got = ours.generate(input_ids=x, adapter_names=names, **kwargs)
        torch.testing.assert_close(got, want)
        # one name per prompt, several sequences per prompt (generate repeats the rows)
        got = ours.generate(input_ids=x, adapter_names=names, num_beams=2, num_return_sequences=2, **kwargs)
        want = hf.generate(input_ids=x, adapter_names=names, num_beams=2, num_return_sequences=2, **kwargs)
        torch.testing.assert_close(got, want)


def test_gradients_flow_through_mixed_batches_when_enabled():
    """With autograd on and trainable adapters the generic path runs, so gradients reach the adapters."""
    hf, ours = build({k: ADAPTERS[k] for k in ("a", "b")})
    for p in ours.parameters():
        p.requires_grad_(False)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_A["b"].weight.requires_grad_(True)
    out = ours(input_ids=ids(2), adapter_names=["a", "b"]).logits
    out.square().mean().backward()
    assert layer.lora_A["b"].weight.grad is not None and layer.lora_A["b"].weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), logits(hf, ids(2), adapter_names=["a", "b"]), atol=ATOL, rtol=0)


def test_plan_and_stack_are_built_once_per_forward(models, monkeypatch):
    hf, ours = models
    built = []
    original = mixed.Stack.__init__

    def counting(self, held, factors, *args):
        built.append(tuple(factors))
        original(self, held, factors, *args)

    monkeypatch.setattr(mixed.Stack, "__init__", counting)
    monkeypatch.setattr(mixed, "strategy", "bmm")
    x = ids(3)
    logits(ours, x, adapter_names=["a", "b", "c"])  # may (re)build stacks
    built.clear()
    logits(ours, x, adapter_names=["c", "a", "b"])
    assert built == []  # nothing changed: every stack reused
    plans = []
    original_plan = mixed.Plan.__init__

    def counting_plan(self, *args, **kwargs):
        plans.append(1)
        original_plan(self, *args, **kwargs)

    monkeypatch.setattr(mixed.Plan, "__init__", counting_plan)
    logits(ours, x, adapter_names=["a", "b", "c"])
    from peft_kernel.layer import adapter_layers

    layers = [layer for _, layer in adapter_layers(ours)]
    distinct = {tuple(mixed.stack_factors(layer, tuple(layer.adapter_names()))) for layer in layers}
    assert len(plans) == len(distinct) < len(layers)


def test_low_rank_parts_equal_the_per_adapter_lookups():
    """LoRA's batched ``low_rank_parts`` (read by every mixed-batch forward) returns the same tensors as
    ``low_rank_factors`` + ``low_rank_bias`` one adapter at a time, for plain, biased, rsLoRA, DoRA and
    aLoRA adapters, in eval and in training with and without dropout."""
    adapters = {**ADAPTERS, "dora": dict(r=4, lora_alpha=8, target_modules=ALL, use_dora=True),
                "drop": dict(r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.1),
                "alora": dict(r=4, lora_alpha=8, target_modules=ALL, alora_invocation_tokens=[3, 4])}
    _, ours = build(adapters)
    layers = [m for m in ours.modules() if hasattr(type(m), "low_rank_parts")]
    assert layers
    for training in (False, True):
        ours.train(training)
        for layer in layers:
            names = (*layer.adapter_names(), "missing")
            parts = layer.low_rank_parts(names)
            expected = {n: (*f, layer.low_rank_bias(n)) for n in names
                        if layer.has_adapter(n) and (f := layer.low_rank_factors(n)) is not None}
            assert list(parts) == list(expected)
            for n, got in parts.items():
                assert all(g is e for g, e in zip(got, expected[n]) if isinstance(e, torch.Tensor) or e is None)
                assert got[2] == expected[n][2]
            assert "dora" not in parts and "alora" not in parts and ("drop" in parts) != training
