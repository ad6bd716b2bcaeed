"""``peft_kernel.compiled``: under ``torch.compile`` the model publishes the rows' adapters as a
tensor of ids (same tensor object from call to call) when every layer can serve the compiled path,
and otherwise runs the eager paths, traced as they are, with the same outputs."""

from __future__ import annotations

import torch
from core_toy import ToyConfig, make_stack, make_x

from peft_kernel import get_peft_model
from peft_kernel.compiled import compiled_rows, publish


class _Ready:
    def __init__(self, ready: bool = True) -> None:
        self.ready = ready
        self.orders: list[tuple[str, ...]] = []

    def prepare_compiled(self, order: tuple[str, ...]) -> bool:
        self.orders.append(order)
        return self.ready


def test_publish_maps_rows_to_model_level_ids_in_one_tensor() -> None:
    layer = _Ready()
    assert publish([layer], ["x", "y"], ["y", "__base__", "x"], ["x"], "cpu")
    rows = compiled_rows()
    assert rows.tolist() == [1, 2, 0] and layer.orders == [("x", "y")]
    assert publish([layer], ["x", "y"], ["x", "x", "y"], ["x"], "cpu")
    assert compiled_rows() is rows and rows.tolist() == [0, 0, 1]  # rewritten in place
    assert publish([layer], ["x", "y"], None, ["y"], "cpu")
    assert compiled_rows().tolist() == [1]  # the active adapter, for every row
    assert not publish([layer], ["x", "y"], None, ["x", "y"], "cpu")  # several active: eager
    assert not publish([_Ready(False)], ["x"], ["x"], ["x"], "cpu")
    assert compiled_rows() is None


def test_methods_without_a_compiled_path_run_eagerly_under_compile() -> None:
    torch._dynamo.reset()
    model = get_peft_model(make_stack(), ToyConfig(target_modules=["q", "v"], init_weights=False), adapter_name="x")
    model.add_adapter("y", ToyConfig(target_modules=["q", "v"], alpha=0.5, init_weights=False))
    model.eval()
    x = make_x(4)
    names = ["y", "x", "__base__", "y"]
    with torch.no_grad():
        fast = torch.compile(model, backend="eager")
        torch.testing.assert_close(fast(x, adapter_names=names), model(x, adapter_names=names), atol=1e-6, rtol=0)
        torch.testing.assert_close(fast(x), model(x), atol=1e-6, rtol=0)
    torch._dynamo.reset()
