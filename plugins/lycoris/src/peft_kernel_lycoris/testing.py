"""Checks LoHa and LoKr share beyond the conformance suite, comparing with HF ``peft`` (the test
oracle) where it has the feature: the config's keys and defaults; training-mode ``rank_dropout`` /
``module_dropout`` (outputs and gradients under one seed); exact gradients; parameter names and
shapes; mixed batches over several adapters (and where HF ignores ``adapter_names``); hotswap;
half-precision bases; reversible merges; ``list-plugins``.

Each plugin's tests call these ``check_*`` functions with its own configs. Imported by tests only.
"""

from __future__ import annotations

import tempfile
from typing import Any

import pytest
import torch

from peft_kernel_testing.models import make_inputs, make_model, output_tensor


def hf_peft() -> Any:
    return pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def check_config_matches_hf(config_class: type, hf_name: str) -> None:
    """``to_dict()`` has exactly HF's keys and default values, and HF's dict loads back here."""
    peft = hf_peft()
    ours = config_class().to_dict()
    theirs = getattr(peft, hf_name)().to_dict()
    theirs = {k: (v.value if hasattr(v, "value") else v) for k, v in theirs.items()}
    assert sorted(ours) == sorted(theirs), f"keys differ: {sorted(set(ours) ^ set(theirs))}"
    for key in ours:
        if key == "peft_version":
            continue
        assert ours[key] == theirs[key], f"{key}: ours {ours[key]!r} vs HF {theirs[key]!r}"
    assert config_class.from_dict(theirs).to_dict() == ours


def hf_and_ours(hf_config: Any, kind: str) -> tuple[Any, Any]:
    """An HF model with a perturbed adapter, and ours loaded from what HF saved (trainable)."""
    peft = hf_peft()
    from peft_kernel import PeftModel

    hf_model = peft.get_peft_model(make_model(kind), hf_config)
    perturb(hf_model)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        ours = PeftModel.from_pretrained(make_model(kind), tmp, is_trainable=True)
    return hf_model, ours


def check_training_matches_hf(hf_config: Any, kind: str, steps: int = 4, hf_wrong_grads: tuple[str, ...] = ()) -> None:
    """In training mode, with one seed, rank/module dropout draw the same masks as HF: equal outputs
    over several forwards, and equal gradients on every adapter parameter — except the containers in
    ``hf_wrong_grads``, whose HF gradients are known to be wrong (see :func:`check_exact_gradients`)."""
    hf_model, ours = hf_and_ours(hf_config, kind)
    hf_model.train()
    ours.train()
    inputs = make_inputs(kind)
    outputs, grads = [], []
    for model in (hf_model, ours):
        torch.manual_seed(1234)
        outs = [output_tensor(model(**inputs)) for _ in range(steps)]
        torch.stack(outs).pow(2).mean().backward()
        outputs.append(torch.stack(outs).detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert (outputs[0] - outputs[1]).abs().max().item() <= 1e-5
    assert sorted(grads[0]) == sorted(grads[1]), "trainable parameter names differ from HF's"
    for name, grad in grads[0].items():
        other = grads[1][name]
        assert (grad is None) == (other is None), name
        if any(f".{container}." in name for container in hf_wrong_grads):
            continue
        if grad is not None:
            assert (grad - other).abs().max().item() <= 1e-5, f"gradient of {name} differs from HF's"
    # different seeds draw different masks: the dropout really is random in training
    ours.zero_grad()
    with torch.no_grad():
        torch.manual_seed(1)
        a = output_tensor(ours(**inputs))
        torch.manual_seed(2)
        b = output_tensor(ours(**inputs))
        assert not torch.allclose(a, b), "training-mode dropout had no effect"
        ours.eval()
        assert torch.equal(output_tensor(ours(**inputs)), output_tensor(ours(**inputs))), "eval mode must be deterministic"


class _DeltaWeight(torch.nn.Module):
    def __init__(self, layer: Any, adapter_name: str) -> None:
        super().__init__()
        self.layer = layer
        self.adapter_name = adapter_name

    def forward(self) -> torch.Tensor:
        return self.layer.delta_weight(self.adapter_name)


def check_exact_gradients(layer: Any, adapter_name: str = "default") -> None:
    """The delta weight's gradients equal finite differences (float64 ``gradcheck``)."""
    from torch.func import functional_call

    wrapper = _DeltaWeight(layer, adapter_name)
    names = [n for n, _ in wrapper.named_parameters() if n.endswith("." + adapter_name)]
    params = dict(wrapper.named_parameters())
    values = tuple(params[n].detach().double().requires_grad_(True) for n in names)

    def delta_weight(*vals: torch.Tensor) -> torch.Tensor:
        return functional_call(wrapper, dict(zip(names, vals)), ())

    assert torch.autograd.gradcheck(delta_weight, values, eps=1e-6, atol=1e-6)


def check_parameters_match_hf(hf_config: Any, our_config: Any, kind: str) -> None:
    """The adapter's parameters have HF's names and shapes (and so HF's on-disk keys)."""
    peft = hf_peft()
    from peft_kernel import get_peft_model

    theirs = {n: tuple(p.shape) for n, p in peft.get_peft_model(make_model(kind), hf_config).named_parameters() if p.requires_grad}
    ours = {n: tuple(p.shape) for n, p in get_peft_model(make_model(kind), our_config).named_parameters() if p.requires_grad}
    assert ours == theirs


def check_identity_at_init(config: Any, kind: str) -> None:
    """A freshly initialised adapter (``init_weights`` True / "lycoris") leaves the output unchanged;
    ``init_weights=False`` changes it."""
    from peft_kernel import get_peft_model

    inputs = make_inputs(kind)
    with torch.no_grad():
        base = output_tensor(make_model(kind)(**inputs))
        out = output_tensor(get_peft_model(make_model(kind), config).eval()(**inputs))
    if config.init_weights is False:
        assert not torch.allclose(out, base, atol=1e-6)
    else:
        assert torch.equal(out, base)


def check_mixed_rows(model: Any, inputs: dict[str, Any], names: list[str]) -> torch.Tensor:
    """The mixed-batch output of ``model`` (in eval mode) for ``adapter_names=names``, after checking
    that every row equals that row of a run with its adapter alone (``"__base__"``: adapters off)."""
    with torch.no_grad():
        mixed = output_tensor(model(**inputs, adapter_names=names))
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    single = output_tensor(model(**inputs))
            else:
                model.set_adapter(name)
                single = output_tensor(model(**inputs))
            assert (mixed[row] - single[row]).abs().max().item() <= 1e-5, f"row {row} ({name})"
    return mixed


def check_mixed_batch_three_adapters(config_factory: Any, kind: str) -> None:
    """``adapter_names`` over three adapters (one unused) and the base: every row matches its
    single-adapter run; in training mode the core refuses mixed batches with a clear error."""
    from peft_kernel import MixedBatchError, get_peft_model

    model = get_peft_model(make_model(kind), config_factory(), adapter_name="one")
    model.add_adapter("two", config_factory())
    model.add_adapter("three", config_factory())
    for name in ("one", "two", "three"):
        model.set_adapter(name)
        perturb(model, seed=len(name))
    model.eval()
    inputs = make_inputs(kind)
    names = ["two", "one", "__base__", "two"]
    check_mixed_rows(model, inputs, names)
    model.train()
    with pytest.raises(MixedBatchError, match="eval"):
        model(**inputs, adapter_names=names)


def check_hf_ignores_what_we_route(hf_config_factory: Any, our_config_factory: Any, kind: str) -> None:
    """HF PEFT 0.21.2 silently uses the active adapter for every row of a LyCORIS mixed batch; here
    each row gets its own adapter (the rows differ from HF's)."""
    peft = hf_peft()
    from peft_kernel import get_peft_model

    hf_model = peft.get_peft_model(make_model(kind), hf_config_factory(), adapter_name="one")
    hf_model.add_adapter("two", hf_config_factory())
    perturb(hf_model)
    ours = get_peft_model(make_model(kind), our_config_factory(), adapter_name="one")
    ours.add_adapter("two", our_config_factory())
    ours.load_state_dict(hf_model.state_dict())
    hf_model.eval()
    ours.eval()
    inputs = make_inputs(kind)
    names = ["one", "two", "one", "two"]
    with torch.no_grad():
        ours_mixed = output_tensor(ours(**inputs, adapter_names=names))
        hf_model.set_adapter("two")
        hf_two = output_tensor(hf_model(**inputs))
        ours.set_adapter("two")
        ours_two = output_tensor(ours(**inputs))
    assert (ours_two - hf_two).abs().max() <= 1e-5
    assert (ours_mixed[1::2] - hf_two[1::2]).abs().max() <= 1e-5
    assert not torch.allclose(ours_mixed[0::2], hf_two[0::2], atol=1e-4), "rows of adapter 'one' used adapter 'two'"


def check_hotswap(config_factory: Any, kind: str) -> None:
    """``hotswap_adapter`` swaps in another saved adapter of the same shapes (alpha included)."""
    import attrs

    from peft_kernel import get_peft_model, hotswap_adapter

    inputs = make_inputs(kind)
    other = get_peft_model(make_model(kind), attrs.evolve(config_factory(), alpha=3))
    perturb(other, seed=5)
    other.eval()
    with torch.no_grad():
        expected = output_tensor(other(**inputs))
    model = get_peft_model(make_model(kind), config_factory())
    perturb(model, seed=6)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        other.save_pretrained(tmp)
        hotswap_adapter(model, tmp, "default")
    with torch.no_grad():
        assert (output_tensor(model(**inputs)) - expected).abs().max() <= 1e-5


def check_half_precision_base(config: Any, kind: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """On a bf16 base, adapter parameters are float32 (HF's autocast_adapter_dtype); forward, merge
    and unmerge work and keep the base dtype."""
    from peft_kernel import get_peft_model

    model = get_peft_model(make_model(kind).to(dtype), config)
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    perturb(model)
    model.eval()
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in make_inputs(kind).items()}
    with torch.no_grad():
        out = output_tensor(model(**inputs))
        assert out.dtype == dtype
        model.merge_adapter()
        merged = output_tensor(model(**inputs))
        model.unmerge_adapter()
    assert (out.float() - merged.float()).abs().max() <= 0.1


def check_merge_in_training_is_reversible(config: Any, kind: str) -> None:
    """Merging never applies rank dropout (HF would draw a mask in training mode, which unmerge could
    not undo): merge + unmerge in training mode restores the base weights."""
    from peft_kernel import get_peft_model

    model = get_peft_model(make_model(kind), config)
    perturb(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.train()
    model.merge_adapter()
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in before:
            assert (p - before[n]).abs().max() <= 1e-5, n


def check_listed_by_cli(capsys: Any, distribution: str, peft_type: str) -> None:
    from peft_kernel.plugin_api import cli_main

    assert cli_main(["list-plugins"]) == 0
    out = capsys.readouterr().out
    row = next((line for line in out.splitlines() if distribution in line.split()), None)
    assert row is not None, out
    assert peft_type in row and "loaded" in row


def check_two_active_adapters_match_hf(hf_config_factory: Any, our_config_factory: Any, kind: str) -> None:
    """Two adapters active at once add up as in HF; merging both (safely) keeps the output, and a
    broken adapter is refused by ``safe_merge`` with the base left untouched."""
    peft = hf_peft()
    from peft_kernel import get_peft_model

    hf_model = peft.get_peft_model(make_model(kind), hf_config_factory(), adapter_name="one")
    hf_model.add_adapter("two", hf_config_factory())
    hf_model.base_model.set_adapter(["one", "two"])
    perturb(hf_model)
    ours = get_peft_model(make_model(kind), our_config_factory(), adapter_name="one")
    ours.add_adapter("two", our_config_factory())
    ours.load_state_dict(hf_model.state_dict())
    ours.set_adapter(["one", "two"])
    hf_model.eval()
    ours.eval()
    inputs = make_inputs(kind)
    with torch.no_grad():
        expected = output_tensor(hf_model(**inputs))
        got = output_tensor(ours(**inputs))
        assert (got - expected).abs().max() <= 1e-5
        ours.merge_adapter(safe_merge=True)
        assert (output_tensor(ours(**inputs)) - expected).abs().max() <= 1e-4
        ours.unmerge_adapter()
        before = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
        next(p for n, p in ours.named_parameters() if ".two" in n).fill_(float("nan"))
        with pytest.raises(ValueError, match="NaN"):
            ours.merge_adapter(adapter_names=["two"], safe_merge=True)
        after = dict(ours.named_parameters())
        assert all(torch.equal(before[n], after[n]) for n in before)
