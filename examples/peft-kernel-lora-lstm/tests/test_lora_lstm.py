"""LoRA for nn.LSTM, provided by this add-on through ``peft_kernel_create_layer`` only.

The LSTM is one target among others: ``target_modules=["lstm", "head"]`` wraps the LSTM with this
package's layer and the Linear head with peft-kernel-lora's own, in one adapter.
"""

from __future__ import annotations

from importlib import metadata

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peft_kernel import PeftModel, get_peft_model, hotswap_adapter
from peft_kernel.errors import TargetNotFoundError
from peft_kernel.layer import AdapterLayer
from peft_kernel.plugins import DISABLE_ENV, get_registry
from peft_kernel_lora import LoraConfig
from peft_kernel_lora_lstm.layers import LoraLSTM


class LSTMNet(nn.Module):
    """Batch-first inputs [B, T, 6] whatever the LSTM's own layout, so ``adapter_names`` lines up."""

    def __init__(self, batch_first: bool = True, bidirectional: bool = False, proj_size: int = 0) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=batch_first, bidirectional=bidirectional, proj_size=proj_size)
        out = (proj_size or 8) * (2 if bidirectional else 1)
        self.head = nn.Linear(out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lstm.batch_first:
            x = x.transpose(0, 1)
        out, (h, c) = self.lstm(x)
        last = out[:, -1] if self.lstm.batch_first else out[-1]
        return self.head(last) + h.sum(0)[:, :1] + c.sum(0)[:, :1]  # the states must be right too


VARIANTS = {
    "batch-first": dict(),
    "time-first-bidirectional-proj": dict(batch_first=False, bidirectional=True, proj_size=4),
}


@pytest.fixture(params=list(VARIANTS))
def make_net(request):
    def make(seed: int = 0) -> LSTMNet:
        torch.manual_seed(seed)
        return LSTMNet(**VARIANTS[request.param]).eval()

    return make


def config(**kwargs) -> LoraConfig:
    return LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["lstm", "head"], **kwargs})


pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

X = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(x=X, **kwargs)


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def build(make_net, adapter_name: str = "default", seed: int = 0) -> PeftModel:
    model = get_peft_model(make_net(), config(), adapter_name=adapter_name)
    perturb(model, seed)
    return model.eval()


def test_plugin_is_installed_and_registers_no_method():
    status = {p.name: p for p in get_registry().plugins}
    assert "lora_lstm" in status, "install the example: pip install -e examples/peft-kernel-lora-lstm"
    assert status["lora_lstm"].status == "loaded", status["lora_lstm"].error
    assert status["lora_lstm"].methods == []
    assert get_registry().method("LORA").distribution == "peft-kernel-lora"


def test_wraps_lstm_next_to_lora_linear(make_net):
    base = make_net()
    model = get_peft_model(make_net(), config()).eval()
    inner = model.get_base_model()
    assert isinstance(inner.lstm, LoraLSTM) and inner.lstm.peft_type == "LORA"
    assert isinstance(inner.head, AdapterLayer) and not isinstance(inner.head, LoraLSTM)
    assert torch.equal(run(model), run(base)), "B starts at zero: the adapter starts as the identity"
    perturb(model, 0)
    assert not torch.allclose(run(model), run(base), atol=1e-6)
    with model.disable_adapter():
        torch.testing.assert_close(run(model), run(base))


def test_save_load_roundtrip(make_net, tmp_path):
    model = build(make_net)
    expected = run(model)
    model.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.lstm.lora_A.weight_ih_l0" in keys and "base_model.model.lstm.lora_B.weight_hh_l1" in keys
    assert "base_model.model.head.lora_A.weight" in keys
    loaded = PeftModel.from_pretrained(make_net(), tmp_path)
    torch.testing.assert_close(run(loaded), expected, atol=1e-6, rtol=1e-6)


def test_merge_equals_unmerged(make_net):
    model = build(make_net)
    unmerged = run(model)
    model.merge_adapter()
    assert model.get_base_model().lstm.merged
    torch.testing.assert_close(run(model), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(run(model), unmerged, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()
    assert type(merged.lstm) is nn.LSTM
    torch.testing.assert_close(run(merged), unmerged, atol=1e-5, rtol=1e-5)


def test_unload_restores_base(make_net):
    model = build(make_net)
    unloaded = model.unload()
    assert type(unloaded.lstm) is nn.LSTM
    torch.testing.assert_close(run(unloaded), run(make_net()))


def test_mixed_batch_rows_equal_single_runs(make_net):
    model = build(make_net, adapter_name="first", seed=0)
    model.add_adapter("second", config())
    model.set_adapter("second")
    perturb(model, 1)
    model.eval()
    singles = {}
    for name in ("first", "second"):
        model.set_adapter(name)
        singles[name] = run(model)
    with model.disable_adapter():
        singles["__base__"] = run(model)
    names = ["second", "__base__", "first", "second"]
    mixed = run(model, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-5, rtol=1e-5)


def test_only_adapter_parameters_train(make_net):
    model = build(make_net).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lstm_lora = [p for n, p in model.named_parameters() if ".lstm.lora_" in n]
    assert lstm_lora and all(p.requires_grad for p in lstm_lora)
    before = [p.detach().clone() for p in lstm_lora]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(x=X).pow(2).mean().backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, b) for p, b in zip(lstm_lora, before))


def test_delete_adapter_leaves_nothing(make_net):
    model = build(make_net)
    keys = set(model.state_dict())
    model.add_adapter("extra", config())
    assert any(".lstm.lora_A.extra." in k for k in model.state_dict())
    model.delete_adapter("extra")
    assert set(model.state_dict()) == keys
    assert "extra" not in model.get_base_model().lstm.scaling


def test_hotswap_replaces_weights_in_place(make_net, tmp_path):
    other = build(make_net, seed=7)
    expected = run(other)
    other.save_pretrained(tmp_path)
    model = build(make_net, seed=0)
    lstm = model.get_base_model().lstm
    hotswap_adapter(model, tmp_path, "default")
    assert model.get_base_model().lstm is lstm
    torch.testing.assert_close(run(model), expected, atol=1e-6, rtol=1e-6)


def test_unsupported_options_are_refused_by_name():
    with pytest.raises(NotImplementedError, match=r"use_dora=True.*'lstm'"):
        get_peft_model(LSTMNet(), config(use_dora=True))


def _only_lora_entry_points():
    return [ep for ep in metadata.entry_points(group="peft_kernel") if ep.name == "lora"]


def test_without_this_package_the_core_says_no_plugin_can_wrap_the_lstm(isolated_registry):
    registry = isolated_registry(entry_points=_only_lora_entry_points())
    assert [p.name for p in registry.plugins] == ["core", "lora"]
    model = LSTMNet()
    with pytest.raises(TargetNotFoundError, match=r"'lstm' of type LSTM .*no installed plugin can wrap it"):
        get_peft_model(model, config())
    assert type(model.lstm) is nn.LSTM and type(model.head) is nn.Linear, "a failed injection leaves the model untouched"
    get_peft_model(model, config(target_modules=["head"]))  # LoRA itself still works


def test_blocking_the_plugin_by_environment(isolated_registry, monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "lora_lstm")
    registry = isolated_registry()
    assert {p.name: p.status for p in registry.plugins}["lora_lstm"] == "blocked"
    with pytest.raises(TargetNotFoundError, match="no installed plugin can wrap it"):
        get_peft_model(LSTMNet(), config())
