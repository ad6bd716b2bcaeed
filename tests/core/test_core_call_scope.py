"""Per-call keywords reaching adapter layers (``MethodRecord.call_keywords``, ``peft_kernel.call_scope``)
and ``peft_kernel_release_config`` (a plugin undoing its model set-up when an adapter leaves)."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Union

import attrs
import core_toy
import pytest
import torch
from core_toy import Stack, make_x
from torch import nn

from peft_kernel import get_peft_model, hookimpl
from peft_kernel.call_scope import current_call
from peft_kernel.config import PeftConfig
from peft_kernel.enums import PeftType
from peft_kernel.layer import AdapterLayer
from peft_kernel.plugins import Registry, build_registry, set_registry
from peft_kernel.records import MethodRecord


@attrs.define(kw_only=True)
class CallToyConfig(PeftConfig):
    """``y = base(x) + shift[row] * x`` on square Linears, ``shift=[...]`` given to each call."""

    peft_type: Optional[Union[PeftType, str]] = "CALLTOY"
    target_modules: Optional[Union[list[str], str]] = None


SEEN: list[Any] = []


class CallToyLinear(AdapterLayer):
    adapter_layer_names = ("calltoy_unused",)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.calltoy_unused = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: Any, module_name: str = "") -> None:
        self.calltoy_unused[adapter_name] = nn.Parameter(torch.zeros(1))

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        scope = current_call()
        SEEN.append(scope)
        shift = scope.values.get("shift") if scope is not None else None
        if shift is None:
            return torch.zeros_like(x)
        scope.memo("calltoy.builds", list).append(1)  # built once per call, however many forwards
        return torch.as_tensor(shift, dtype=x.dtype).unsqueeze(-1) * x

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return torch.zeros_like(self.base_layer.weight)


class GenStack(Stack):
    """A toy with a ``generate`` that runs its forward twice (a prefill and one step)."""

    def generate(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self(x), self(x)]


class _CallToyPlugin:
    def __init__(self) -> None:
        self.released: list[tuple[Any, Any, list]] = []

    @hookimpl
    def peft_kernel_register_methods(self, register: Callable[[MethodRecord], None]) -> None:
        register(MethodRecord(peft_type="CALLTOY", config_class=CallToyConfig, prefix="calltoy_",
                              tuner_name="CallToyModel", capabilities={"multi_adapter"}, call_keywords={"shift"}))

    @hookimpl
    def peft_kernel_create_layer(self, config: Any, adapter_name: str, base_layer: Any, module_name: str) -> Any:
        if not isinstance(config, CallToyConfig) or not isinstance(base_layer, nn.Linear):
            return None
        layer = CallToyLinear(base_layer)
        layer.update_layer(adapter_name, config, module_name)
        return layer

    @hookimpl
    def peft_kernel_release_config(self, config: Any, model: Any, remaining: Any) -> None:
        self.released.append((config, model, list(remaining)))


PLUGIN = _CallToyPlugin()


@pytest.fixture(autouse=True)
def toy_registry() -> Iterator[Registry]:
    registry = build_registry(entry_points=[], extra_plugins={"toy": core_toy, "calltoy": PLUGIN}, disabled=[])
    old = set_registry(registry)
    SEEN.clear()
    PLUGIN.released.clear()
    try:
        yield registry
    finally:
        set_registry(old)


def _model(base: nn.Module | None = None) -> Any:
    torch.manual_seed(0)
    return get_peft_model(base or GenStack().eval(), CallToyConfig(target_modules=["head"]))


def _expected(shift: list[float]) -> torch.Tensor:
    torch.manual_seed(0)
    plain = GenStack().eval()
    x = make_x(4)
    hidden = plain.encoder(x)
    return plain.classifier(torch.relu(plain.head(hidden) + torch.tensor(shift).unsqueeze(-1) * hidden))


def test_layers_read_the_calls_keywords_which_the_model_never_sees() -> None:
    model = _model()
    shift = [0.0, 1.0, 2.0, 3.0]
    with torch.no_grad():
        assert torch.allclose(model(make_x(4), shift=shift), _expected(shift), atol=1e-6)
        assert torch.allclose(model.base_model(make_x(4), shift=shift), _expected(shift), atol=1e-6)
        assert torch.allclose(model(make_x(4)), _expected([0.0] * 4), atol=1e-6)
    assert SEEN[0].kind == "forward" and SEEN[0].argument("x") is not None
    assert SEEN[-1].values == {} and current_call() is None  # published for the call only


def test_generate_publishes_one_scope_for_all_its_forwards() -> None:
    model = _model()
    with torch.no_grad():
        outputs = model.generate(make_x(4), shift=[1.0, 1.0, 0.0, 0.0])
    assert all(torch.allclose(o, _expected([1.0, 1.0, 0.0, 0.0]), atol=1e-6) for o in outputs)
    assert len(SEEN) == 2 and SEEN[0] is SEEN[1] and SEEN[0].kind == "generate"
    assert SEEN[0].memo("calltoy.builds", list) == [1, 1]  # one list for the call's two forwards
    assert torch.equal(SEEN[0].argument("x"), make_x(4))


def test_methods_without_call_keywords_hand_them_to_the_model() -> None:
    model = get_peft_model(Stack().eval(), core_toy.ToyConfig(target_modules=["head"]))
    assert not model.base_model.call_keywords
    with pytest.raises(TypeError, match="shift"):
        model(make_x(2), shift=[1.0, 2.0])


def test_release_config_runs_when_an_adapter_leaves() -> None:
    model = _model()
    first = model.peft_config["default"]
    model.add_adapter("other", CallToyConfig(target_modules=["head"]))
    other = model.peft_config["other"]
    base = model.get_base_model()
    model.delete_adapter("default")
    assert PLUGIN.released == [(first, base, [other])]
    PLUGIN.released.clear()
    assert model.unload() is base
    assert PLUGIN.released == [(other, base, [])]
    PLUGIN.released.clear()
    merged = _model().merge_and_unload()
    assert [(type(c).__name__, m, r) for c, m, r in PLUGIN.released] == [("CallToyConfig", merged, [])]
