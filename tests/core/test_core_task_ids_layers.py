"""Per-row ``task_ids`` reaching adapter layers: a method whose record declares the ``task_ids``
capability gets a tuner that takes ``task_ids`` out of ``forward`` / ``generate`` keywords and
publishes them for the call (``peft_kernel.routing.current_task_ids``), repeated for batches that
are a multiple of the rows given; methods without the capability never see them."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Union

import attrs
import core_toy
import pytest
import torch
from core_toy import ToyConfig, make_stack, make_x
from torch import nn

from peft_kernel import MixedBatchError, get_peft_model, hookimpl
from peft_kernel.config import PeftConfig
from peft_kernel.enums import PeftType
from peft_kernel.layer import AdapterLayer
from peft_kernel.plugins import Registry, build_registry, set_registry
from peft_kernel.records import MethodRecord
from peft_kernel.routing import current_task_ids, tasks_routed


@attrs.define(kw_only=True)
class TaskToyConfig(PeftConfig):
    """``y = base(x) + scale[task] * x`` on square Linears, one scale per task."""

    peft_type: Optional[Union[PeftType, str]] = "TASKTOY"
    target_modules: Optional[Union[list[str], str]] = None
    n_tasks: int = 3


class TaskToyLinear(AdapterLayer):
    adapter_layer_names = ("tasktoy_scale",)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.tasktoy_scale = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: Any, module_name: str = "") -> None:
        self.tasktoy_scale[adapter_name] = nn.Parameter(torch.arange(1.0, config.n_tasks + 1))

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        tasks = current_task_ids(x.shape[0], x.device)
        assert tasks is not None, "the layer saw no task_ids"
        return self.tasktoy_scale[adapter_name][tasks].unsqueeze(-1) * x


class _TaskToyPlugin:
    @hookimpl
    def peft_kernel_register_methods(self, register: Callable[[MethodRecord], None]) -> None:
        register(MethodRecord(peft_type="TASKTOY", config_class=TaskToyConfig, prefix="tasktoy_",
                              tuner_name="TaskToyModel", capabilities={"task_ids"}))

    @hookimpl
    def peft_kernel_create_layer(self, config: Any, adapter_name: str, base_layer: Any, module_name: str) -> Any:
        if not isinstance(config, TaskToyConfig) or not isinstance(base_layer, nn.Linear):
            return None
        layer = TaskToyLinear(base_layer)
        layer.update_layer(adapter_name, config, module_name)
        return layer


@pytest.fixture(autouse=True)
def toy_registry() -> Iterator[Registry]:
    registry = build_registry(entry_points=[], extra_plugins={"toy": core_toy, "tasktoy": _TaskToyPlugin()},
                              disabled=[])
    old = set_registry(registry)
    try:
        yield registry
    finally:
        set_registry(old)


def test_layers_read_each_rows_task() -> None:
    x = make_x(4)
    model = get_peft_model(make_stack(), TaskToyConfig(target_modules=["head"]))
    assert model.base_model.takes_task_ids
    plain = make_stack()
    tasks = torch.tensor([0, 2, 1, 2])
    hidden = plain.encoder(x)
    expected = plain.classifier(torch.relu(plain.head(hidden) + (tasks + 1.0).unsqueeze(-1) * hidden))
    with torch.no_grad():
        assert torch.allclose(model(x, task_ids=tasks), expected, atol=1e-6)
        assert torch.allclose(model.base_model(x, task_ids=tasks.tolist()), expected, atol=1e-6)
    assert current_task_ids(4, x.device) is None  # published for the call only


def test_task_ids_repeat_for_expanded_batches_and_bad_ids_are_named() -> None:
    with tasks_routed([3, 1]):
        assert current_task_ids(4, torch.device("cpu")).tolist() == [3, 3, 1, 1]
        with pytest.raises(MixedBatchError, match="task_ids has 2 entries but the layer sees a batch of 3 rows"):
            current_task_ids(3, torch.device("cpu"))
    with pytest.raises(MixedBatchError, match="integer task id"):
        with tasks_routed(torch.tensor([0.5])):
            pass


def test_methods_without_the_capability_keep_task_ids_out() -> None:
    model = get_peft_model(make_stack(), ToyConfig(target_modules=["head"]))
    assert not model.base_model.takes_task_ids
    with pytest.raises(TypeError, match="task_ids"):  # handed to the user's model, as HF PEFT does
        model(make_x(2), task_ids=torch.tensor([0, 1]))
