"""RoAd's ``(c, s)`` per adapter and the mixed-batch table are computed once and reused across
forwards while the adapters are unchanged: fresh after in-place writes (against HF peft), after an
adapter is deleted and added again, and recomputed under autograd (gradients through a mixed batch
equal those of single-adapter runs)."""

import pytest

import peft_kernel_road.layers as road_layers
from peft_kernel import get_peft_model
from peft_kernel_testing import run
from peft_kernel_testing.freshness import check_cached_adapters_stay_fresh
from peft_kernel_testing.hf_oracle import perturb
from peft_kernel_testing.models import make_inputs, make_model
from peft_kernel_testing.mixed_checks import check_mixed_gradients_equal_single_runs
from peft_kernel_road import RoadConfig

pytest.importorskip("peft")

CONFIG = dict(target_modules=["q_proj", "v_proj", "up_proj"], group_size=4, init_weights=False)


def _model():
    model = get_peft_model(make_model("llama"), RoadConfig(**CONFIG), adapter_name="one")
    model.add_adapter("two", RoadConfig(**CONFIG, variant="road_4"))
    return model.eval()


def _singles(model, inputs):
    out = {}
    for name in ("one", "two"):
        model.set_adapter(name)
        out[name] = run(model, inputs)
    with model.disable_adapter():
        out["__base__"] = run(model, inputs)
    return out


@pytest.mark.parametrize("names", [("b", "__base__", "a", "b"), ("a", "a", "b", "b")])
def test_mixed_and_single_runs_equal_hf_after_in_place_writes(names):
    check_cached_adapters_stay_fresh("llama", lambda: RoadConfig(**CONFIG), names=names)


def test_coefficients_are_computed_once_across_forwards(monkeypatch):
    model = _model()
    calls = []
    original = road_layers.coefficients
    monkeypatch.setattr(road_layers, "coefficients", lambda *a: calls.append(a[0]) or original(*a))
    inputs = make_inputs("llama")
    for _ in range(3):
        run(model, inputs, adapter_names=["two", "one", "__base__", "two"])
        run(model, inputs)
    assert len(calls) == 2 * 3 * 2  # two adapters on three modules of two layers, once each


def test_a_deleted_and_re_added_adapter_is_seen_by_the_mixed_table():
    model = _model()
    names = ["two", "one", "__base__", "two"]
    inputs = make_inputs("llama")
    run(model, inputs, adapter_names=names)
    model.delete_adapter("two")
    model.add_adapter("two", RoadConfig(**CONFIG))
    model.set_adapter("two")
    perturb(model, 5)
    model.eval()
    mixed, singles = run(model, inputs, adapter_names=names), _singles(model, inputs)
    for row, name in enumerate(names):
        assert (mixed[row] - singles[name][row]).abs().max() <= 1e-6, (row, name)


def test_gradients_through_a_mixed_batch_equal_single_adapter_runs():
    check_mixed_gradients_equal_single_runs(_model(), make_inputs("llama"), ["two", "one", "__base__", "two"], "road_")
