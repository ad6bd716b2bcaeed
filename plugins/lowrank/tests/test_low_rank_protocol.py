"""The stacked kernels of ``peft_kernel_lowrank.mixed`` serve any layer implementing the core's
``LowRankLayer`` protocol, not only LoRA: a toy low-rank method (its own attribute names, no LoRA
installed or imported) gets every kernel, each row equal to that row run with its own adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, LowRankLayer, Routing
from peft_kernel_lowrank import mixed

TOL = 1e-5
ROWS = ["a", "b", "__base__", "c", "a", "frozen", "b"]


class ToyLowRank(AdapterLayer):
    """``scale * up(down(x))`` under other names than LoRA's; adapter ``frozen`` says it is not
    low-rank right now (as DoRA or live dropout do), so its rows take the layer's own ``delta``."""

    adapter_layer_names = ("toy_down", "toy_up")
    other_param_names = ("toy_scale",)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.toy_down = nn.ParameterDict()
        self.toy_up = nn.ParameterDict()
        self.toy_scale: dict[str, float] = {}

    def add(self, name: str, r: int, scale: float, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.toy_down[name] = nn.Parameter(torch.randn(r, self.base_layer.in_features, generator=g))
        self.toy_up[name] = nn.Parameter(torch.randn(self.base_layer.out_features, r, generator=g))
        self.toy_scale[name] = scale

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self.toy_scale[adapter_name] * (x @ self.toy_down[adapter_name].T) @ self.toy_up[adapter_name].T

    def low_rank_factors(self, adapter_name: str):
        if adapter_name not in self.toy_scale or adapter_name == "frozen":
            return None
        return self.toy_down[adapter_name], self.toy_up[adapter_name], self.toy_scale[adapter_name]


@pytest.fixture
def layer() -> ToyLowRank:
    torch.manual_seed(0)
    toy = ToyLowRank(nn.Linear(16, 12))
    for i, (name, r, scale) in enumerate([("a", 2, 0.5), ("b", 4, 2.0), ("c", 3, 1.0), ("frozen", 2, 1.5)]):
        toy.add(name, r, scale, seed=i)
    return toy.eval().requires_grad_(False)


def _reference(layer: ToyLowRank, x: torch.Tensor) -> torch.Tensor:
    rows = []
    for i, name in enumerate(ROWS):
        out = layer.base_layer(x[i : i + 1])
        rows.append(out if name == "__base__" else out + layer.delta(x[i : i + 1], name))
    return torch.cat(rows)


def test_the_toy_layer_satisfies_the_protocol(layer):
    assert isinstance(layer, LowRankLayer)
    a, b, scale = layer.low_rank_factors("b")
    assert a.shape == (4, 16) and b.shape == (12, 4) and scale == 2.0
    assert a is layer.toy_down["b"]  # the live tensors, not copies


@pytest.mark.parametrize("kernel", ["bmm", "concat", "grouped", "auto"])
def test_every_kernel_serves_a_non_lora_low_rank_layer(layer, kernel, monkeypatch):
    monkeypatch.setattr(mixed, "strategy", kernel)
    x = torch.randn(len(ROWS), 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = mixed.mixed_forward(layer, x, Routing(ROWS))
        expected = _reference(layer, x)
    assert out is not None, "the toy layer fell back to the generic path"
    torch.testing.assert_close(out, expected, atol=TOL, rtol=0)
    assert set(layer.__dict__["_low_rank_stack"].names) == {"a", "b", "c"}


def test_single_adapter_forward_from_factors(layer):
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = mixed.add_single(layer, layer.base_layer(x), x, "c")
        torch.testing.assert_close(out, layer.base_layer(x) + layer.delta(x, "c"), atol=TOL, rtol=0)


def test_the_stack_follows_writes_and_new_adapters(layer):
    x = torch.randn(len(ROWS), 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mixed.mixed_forward(layer, x, Routing(ROWS))
        first = layer.__dict__["_low_rank_stack"]
        mixed.mixed_forward(layer, x, Routing(ROWS))
        assert layer.__dict__["_low_rank_stack"] is first  # nothing changed: reused
        layer.toy_up["a"].mul_(3)  # an in-place write (an optimizer step, a load)
        layer.toy_scale["b"] = 0.25  # a rescale
        layer.add("d", 5, 1.0, seed=9)
        out = mixed.mixed_forward(layer, x, Routing([*ROWS[:-1], "d"]))
    assert layer.__dict__["_low_rank_stack"] is not first
    expected = []
    for i, name in enumerate([*ROWS[:-1], "d"]):
        row = layer.base_layer(x[i : i + 1])
        expected.append(row if name == "__base__" else row + layer.delta(x[i : i + 1], name))
    torch.testing.assert_close(out, torch.cat(expected), atol=TOL, rtol=0)
