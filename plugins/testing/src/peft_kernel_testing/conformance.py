"""The conformance suite every method plugin runs on its own configs.

In a plugin's test module::

    from peft_kernel_testing import ConformanceCase, conformance_suite
    TestMyMethod = conformance_suite([
        ConformanceCase("mlp", lambda: MyConfig(target_modules=["lin0", "lin1"])),
    ])

Each case runs every check; a check the method's declared capabilities do not allow (merging for a
method without ``mergeable``, mixed batches without ``mixed_batch``) is skipped *visibly* with the
reason. Cross-loading against HF ``peft`` is skipped visibly when ``peft`` is not installed.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any, Callable

import attrs
import pytest
import torch
from torch import nn

from peft_kernel.plugin_api import AdapterLayer
from peft_kernel_testing.hf_oracle import hf_oracle, hf_reads_ours, max_abs_diff, perturb, run
from peft_kernel_testing.models import make_inputs, make_model, output_tensor


@attrs.define
class ConformanceCase:
    """One (model, config) pair to check.

    ``config`` builds a fresh config each call. ``changes_base_at_init`` marks initialisations that
    rewrite base weights (PiSSA, OLoRA): disable/unload then give the residual model, not the base.
    ``perturb`` adds noise to adapter tensors so adapters compute something non-trivial.
    """

    model: str | Callable[[], nn.Module]
    config: Callable[[], Any]
    id: str = ""
    inputs: Callable[[], dict[str, Any]] | None = None
    """Keyword inputs for a plugin's own model (``model`` given as a factory); built-in kinds have theirs."""
    tolerance: float = 1e-5
    changes_base_at_init: bool = False
    perturb: bool = True
    hf: bool = True
    second_config: Callable[[], Any] | None = None
    """The config of the extra adapter the mixed-batch and delete checks add (``config`` when
    ``None``): a method allowing one trainable adapter (AdaLoRA) gives one in ``inference_mode``."""

    def __attrs_post_init__(self) -> None:
        if not self.id:
            self.id = self.model if isinstance(self.model, str) else getattr(self.model, "__name__", "custom")
        if not isinstance(self.model, str) and self.inputs is None:
            raise ValueError(f"ConformanceCase {self.id!r}: a model factory needs an `inputs` factory too")

    def make_model(self) -> nn.Module:
        """A fresh base model, identical on every call."""
        if isinstance(self.model, str):
            return make_model(self.model)
        torch.manual_seed(0)
        return self.model().eval()

    def make_inputs(self) -> dict[str, Any]:
        return self.inputs() if self.inputs is not None else make_inputs(self.model)


def _record(config: Any) -> Any:
    from peft_kernel.plugin_api import get_registry

    return get_registry().method_for_config(config)


def _build(case: ConformanceCase, adapter_name: str = "default", seed: int = 0) -> Any:
    from peft_kernel import get_peft_model

    model = get_peft_model(case.make_model(), case.config(), adapter_name=adapter_name)
    if case.perturb:
        perturb(model, seed)
    return model.eval()


def _trained_copies(model: Any) -> dict[str, nn.Module]:
    """``{path in the base model: the active adapter's copy}`` for every ``modules_to_save`` wrapper."""
    from peft_kernel import ModulesToSaveWrapper

    return {
        path: module.modules_to_save[module.active_adapter]
        for path, module in model.get_base_model().named_modules()
        if isinstance(module, ModulesToSaveWrapper) and module.active_adapter is not None
    }


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    diff = max_abs_diff(a, b)
    assert diff <= tol, f"{what}: max abs difference {diff:.3e} > {tol:.1e}"


def _hf():
    return pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")


def _hf_config(config: Any) -> Any:
    peft = _hf()
    data = config.to_dict()
    return peft.get_peft_config(data)


class _Checks:
    """The checks; ``conformance_suite`` parametrizes them over cases."""

    def test_output_changes(self, case: ConformanceCase) -> None:
        model = _build(case)
        inputs = case.make_inputs()
        base = run(case.make_model(), inputs)
        out = run(model, inputs)
        assert out.shape == base.shape
        assert not torch.allclose(out, base, atol=1e-6), "the adapter did not change the output"

    def test_merge_unmerge(self, case: ConformanceCase) -> None:
        model = _build(case)
        if not _record(model.active_peft_config).supports("mergeable"):
            pytest.skip(f"{model.active_peft_config.peft_type} declares no 'mergeable' capability")
        inputs = case.make_inputs()
        unmerged = run(model, inputs)
        model.merge_adapter()
        _close(run(model, inputs), unmerged, max(case.tolerance, 1e-4), "merged vs unmerged")
        model.unmerge_adapter()
        _close(run(model, inputs), unmerged, max(case.tolerance, 1e-4), "after unmerge vs unmerged")
        merged_model = model.merge_and_unload()
        _close(run(merged_model, inputs), unmerged, max(case.tolerance, 1e-4), "merge_and_unload vs unmerged")

    def test_disable_is_base(self, case: ConformanceCase) -> None:
        if case.changes_base_at_init:
            pytest.skip("this initialisation rewrites the base weights")
        model = _build(case)
        inputs = case.make_inputs()
        base = run(case.make_model(), inputs)
        with model.disable_adapter():
            _close(run(model, inputs), base, case.tolerance, "disabled vs base")
        assert not torch.allclose(run(model, inputs), base, atol=1e-6), "adapter stayed disabled after the block"

    def test_unload_is_base(self, case: ConformanceCase) -> None:
        """``unload`` gives the base model, except that a ``modules_to_save`` module is the active
        adapter's trained copy (as in HF PEFT): the reference is the base model with those copies in."""
        if case.changes_base_at_init:
            pytest.skip("this initialisation rewrites the base weights")
        model = _build(case)
        inputs = case.make_inputs()
        base_model = case.make_model()
        trained = _trained_copies(model)
        for path, module in trained.items():
            base_model.set_submodule(path, copy.deepcopy(module))
        unloaded = model.unload()
        for path, module in trained.items():
            assert unloaded.get_submodule(path) is module, f"unload did not keep the active adapter's copy of {path!r}"
        _close(run(unloaded, inputs), run(base_model, inputs), case.tolerance, "unload vs base (saved modules: trained copies)")
        assert set(dict(unloaded.named_parameters())) == set(dict(base_model.named_parameters()))

    def test_save_load_roundtrip(self, case: ConformanceCase) -> None:
        from peft_kernel import PeftModel

        model = _build(case)
        inputs = case.make_inputs()
        expected = run(model, inputs)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            loaded = PeftModel.from_pretrained(case.make_model(), tmp)
        _close(run(loaded, inputs), expected, case.tolerance, "reloaded vs saved")

    def test_hf_to_ours(self, case: ConformanceCase) -> None:
        if not case.hf:
            pytest.skip("no HF peft counterpart for this case")
        peft = _hf()
        from peft_kernel import PeftModel

        hf_config = _hf_config(case.config())
        inputs = case.make_inputs()
        with tempfile.TemporaryDirectory() as tmp:
            with hf_oracle("HF peft building, running and saving the adapter"):
                hf_model = peft.get_peft_model(case.make_model(), hf_config)
                perturb(hf_model, 0)
                hf_model.eval()
                expected = run(hf_model, inputs)
                hf_model.save_pretrained(tmp)
            ours = PeftModel.from_pretrained(case.make_model(), tmp)
        _close(run(ours, inputs), expected, case.tolerance, "ours (loaded from HF peft) vs HF peft")

    def test_ours_to_hf(self, case: ConformanceCase) -> None:
        if not case.hf:
            pytest.skip("no HF peft counterpart for this case")
        peft = _hf()
        model = _build(case)
        inputs = case.make_inputs()
        expected = run(model, inputs)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            got = hf_reads_ours(
                "HF peft loading and running our adapter",
                lambda: run(peft.PeftModel.from_pretrained(case.make_model(), tmp).eval(), inputs),
                lambda: run(peft.get_peft_model(case.make_model(), _hf_config(case.config())).eval(), inputs),
            )
        _close(got, expected, case.tolerance, "HF peft (loaded from ours) vs ours")

    def test_status_matches_hf(self, case: ConformanceCase) -> None:
        """``get_layer_status`` (layer names, HF's module type names, adapters, trainability),
        ``get_model_status`` and the trainable / total parameter counts are HF's."""
        if not case.hf:
            pytest.skip("no HF peft counterpart for this case")
        peft = _hf()
        from peft_kernel import get_peft_model

        def layers(model: Any) -> list[tuple[Any, ...]]:
            return [(s.name, s.module_type, s.enabled, s.active_adapters, s.merged_adapters, s.requires_grad,
                     s.available_adapters) for s in model.get_layer_status()]

        def summary(model: Any) -> tuple[Any, ...]:
            s = model.get_model_status()
            return (s.trainable_params, s.total_params, s.num_adapter_layers, s.enabled, s.active_adapters,
                    s.merged_adapters, s.requires_grad, s.available_adapters)

        ours = get_peft_model(case.make_model(), case.config())
        with hf_oracle("HF peft building the adapter"):
            theirs = peft.get_peft_model(case.make_model(), _hf_config(case.config()))
        assert layers(ours) == layers(theirs)
        assert summary(ours) == summary(theirs)
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()

    def test_lora_conversion_follows_capability(self, case: ConformanceCase) -> None:
        """A method declaring ``additive`` converts to a LoRA (``save_as_lora``) that reproduces the
        adapter's outputs at full rank; any other method is refused with HF's ``TypeError``."""
        conversion = pytest.importorskip("peft_kernel_lora.lora_conversion")
        from peft_kernel import PeftModel

        model = _build(case)
        record = _record(model.active_peft_config)
        if record.supports("prompt_learning"):
            pytest.skip("prompt learning adds no layers to convert")
        if getattr(model.active_peft_config, "bias", "none") != "none":
            pytest.skip("a trained bias has no LoRA form (refused with a ValueError, as HF)")
        if case.changes_base_at_init:
            pytest.skip("the adapter is relative to a rewritten base (PiSSA, OLoRA): a LoRA of the original base differs")
        layers = [m for _, m in model.named_modules() if isinstance(m, AdapterLayer)]
        if not record.supports("additive") or not all(conversion.supports_lora_conversion(m) for m in layers):
            with pytest.raises(TypeError, match="do not support LoRA conversion"):
                conversion.convert_to_lora(model, 2)
            return
        inputs = case.make_inputs()
        expected = run(model, inputs)
        with tempfile.TemporaryDirectory() as tmp:
            conversion.save_as_lora(tmp, model, rank=1.0)  # every singular value: the exact delta
            converted = PeftModel.from_pretrained(case.make_model(), tmp)
        _close(run(converted, inputs), expected, max(case.tolerance, 1e-4), "full-rank LoRA conversion vs adapter")

    def test_mixed_batch_rows(self, case: ConformanceCase) -> None:
        model = _build(case, adapter_name="first", seed=0)
        if not _record(model.active_peft_config).supports("mixed_batch"):
            pytest.skip(f"{model.active_peft_config.peft_type} declares no 'mixed_batch' capability")
        model.add_adapter("second", (case.second_config or case.config)())
        model.set_adapter("second")
        perturb(model, 1)
        model.eval()
        inputs = case.make_inputs()
        singles = {}
        for name in ("first", "second"):
            model.set_adapter(name)
            singles[name] = run(model, inputs)
        with model.disable_adapter():
            singles["__base__"] = run(model, inputs)
        names = ["second", "__base__", "first", "second"][: next(iter(inputs.values())).shape[0]]
        mixed = run(model, inputs, adapter_names=names)
        for row, name in enumerate(names):
            _close(mixed[row], singles[name][row], max(case.tolerance, 1e-5), f"mixed row {row} ({name}) vs single run")

    def test_delete_leaves_nothing(self, case: ConformanceCase) -> None:
        model = _build(case)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.add_adapter("extra", (case.second_config or case.config)())
        model.delete_adapter("extra")
        after = model.state_dict()
        assert set(after) == set(before), f"keys left behind: {sorted(set(after) ^ set(before))[:5]}"
        if not case.changes_base_at_init:  # PiSSA/OLoRA rewrite base weights when an adapter is added
            changed = [k for k in before if not torch.equal(before[k], after[k])]
            assert not changed, f"tensors changed by add + delete: {changed[:5]}"
        assert "extra" not in model.peft_config
        assert not [n for n, _ in model.named_modules() if n.endswith(".extra")]

    def test_only_adapter_parameters_train(self, case: ConformanceCase) -> None:
        model = _build(case)
        model.train()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable, "nothing is trainable"
        frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        inputs = case.make_inputs()
        for _ in range(3):
            optimizer.zero_grad()
            output_tensor(model(**inputs)).float().pow(2).mean().backward()
            optimizer.step()
        for name, value in model.named_parameters():
            if name in frozen_before:
                assert torch.equal(value, frozen_before[name]), f"frozen parameter {name} changed"
        changed = [n for n, p in model.named_parameters() if n in trainable_before and not torch.equal(p, trainable_before[n])]
        assert changed, "no trainable parameter changed after 3 optimizer steps"


CHECKS = [name for name in vars(_Checks) if name.startswith("test_")]


def conformance_suite(cases: list[ConformanceCase]) -> type:
    """A pytest test class running every check on every case (assign it to a ``Test*`` name)."""

    @pytest.fixture(params=cases, ids=[c.id for c in cases])
    def case(self: Any, request: Any) -> ConformanceCase:
        return request.param

    return type("ConformanceSuite", (_Checks,), {"case": case, "__test__": True})
