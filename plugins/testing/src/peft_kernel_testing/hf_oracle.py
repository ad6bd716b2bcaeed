"""Checks against HF ``peft`` that method plugins share (HF is the oracle in tests only)."""

from __future__ import annotations

import contextlib
import os
import sysconfig
import tempfile
from typing import Any, Callable, Iterator, Sequence

import pytest
import torch
from torch import nn

from peft_kernel_testing.models import make_inputs, make_model, output_tensor


# ---- telling the oracle's failures from ours ------------------------------------------------
_LIBRARY_DIRS = tuple(
    os.path.normcase(os.path.realpath(path)) + os.sep
    for path in {sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib", "platstdlib")}
)


def _owner(frame: Any) -> str | None:
    """``"oracle"`` for HF peft's code, ``"ours"`` for peft-kernel, its plugins and the tests, None for
    everything both call into (transformers, torch, the standard library, pytest)."""
    module = str(frame.f_globals.get("__name__") or "")
    top = module.split(".")[0]
    if top == "peft":
        return "oracle"
    if top.startswith("peft_kernel"):
        return "ours"
    filename = frame.f_code.co_filename
    if filename.startswith("<"):
        return None
    if os.path.normcase(os.path.realpath(filename)).startswith(_LIBRARY_DIRS):
        return None
    return "ours"


def raised_by_oracle(exc: BaseException) -> bool:
    """Whether HF peft raised ``exc``: of the traceback's frames that are HF peft's or ours, the
    innermost (the last code of either side that ran) is HF peft's. An error transformers raises
    under HF peft is the oracle's; one it raises under our code, or an assertion in a test, is ours."""
    owner = None
    for tb in _walk(exc.__traceback__):
        owner = _owner(tb.tb_frame) or owner
    return owner == "oracle"


def _walk(tb: Any) -> Iterator[Any]:
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("peft", "transformers", "torch"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:  # pragma: no cover
            pass
    return ", ".join(found)


def oracle_failure_message(what: str, exc: BaseException) -> str:
    """``oracle failure (<versions>): <what>: HF peft raised <Type>: <message> [at file:line]``."""
    where = ""
    frames = [(tb.tb_frame, tb.tb_lineno) for tb in _walk(exc.__traceback__) if _owner(tb.tb_frame) == "oracle"]
    if frames:
        frame, line = frames[-1]
        where = f" [at {frame.f_globals.get('__name__')}:{line}]"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"oracle failure ({_versions()}): {what}: HF peft raised {type(exc).__name__}: {message}{where}"


@contextlib.contextmanager
def hf_oracle(what: str = "HF peft") -> Iterator[None]:
    """Wrap calls into HF peft, the test oracle. When HF peft itself raises (see
    :func:`raised_by_oracle`), the test ends as xfail with the oracle's error and versions: the check
    could not be made, which is neither our failure (no false red) nor a pass (no false green).
    Anything else raised in the block (our code, a failed assertion) propagates unchanged.

    Wrap only HF peft working on what it built itself (the reference). HF loading or running files
    *we* wrote is the check under test, not the oracle: keep it outside, after a wrapped control in
    which HF runs its own adapter, so that an HF that cannot run at all xfails before it. Put our own
    checks that need no oracle before the first wrapped call, so they still run."""
    try:
        yield
    except Exception as exc:
        if raised_by_oracle(exc):
            pytest.xfail(oracle_failure_message(what, exc))
        raise


def hf_reads_ours(what: str, check: Callable[[], Any], control: Callable[[], Any]) -> Any:
    """Run ``check``, HF peft loading or running what *we* produced: the thing under test, so its
    errors are ours. Only when HF peft raises does ``control`` run (HF doing the same with an adapter
    it built itself), under :func:`hf_oracle`: if HF fails there too, the oracle is broken and the
    test xfails; if not, the original error is raised."""
    try:
        return check()
    except Exception as exc:
        if not raised_by_oracle(exc):
            raise
        with hf_oracle(f"{what} (HF peft fails on its own adapter too)"):
            control()
        raise


def hf_peft() -> Any:
    """The ``peft`` module, or a visible skip when it is not installed."""
    return pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")


def perturb(model: nn.Module, seed: int, scale: float = 0.2) -> None:
    """Deterministic noise added to every trainable tensor (the adapters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def run(model: nn.Module, inputs: dict[str, Any], **kwargs: Any) -> torch.Tensor:
    """The model's main output tensor, without gradients."""
    with torch.no_grad():
        return output_tensor(model(**inputs, **kwargs)).detach().clone()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute elementwise difference, in float32."""
    return (a.float() - b.float()).abs().max().item()


def check_mixed_batch_against_hf(
    kind: str,
    hf_config: Callable[[], Any],
    randomize: Callable[[nn.Module, int], None] = perturb,
    names: Sequence[str] = ("second", "__base__", "first", "second"),
    tolerance: float = 1e-5,
) -> None:
    """HF peft builds adapters ``first`` and ``second`` and saves them; ours loads both and serves
    one mixed batch; every row must equal HF's output with that row's adapter active (HF itself
    ignores ``adapter_names`` for most methods, so single-adapter runs are the reference)."""
    peft = hf_peft()
    from peft_kernel import PeftModel

    inputs = make_inputs(kind)
    with tempfile.TemporaryDirectory() as tmp:
        with hf_oracle("HF peft building, saving and running two adapters"):
            hf = peft.get_peft_model(make_model(kind), hf_config(), adapter_name="first")
            hf.add_adapter("second", hf_config())
            for seed, name in enumerate(("first", "second")):
                hf.set_adapter(name)
                randomize(hf, 3 + seed)
            hf.eval()
            hf.save_pretrained(tmp)
            expected = {}
            for name in ("first", "second"):
                hf.set_adapter(name)
                expected[name] = run(hf, inputs)
            with hf.disable_adapter():
                expected["__base__"] = run(hf, inputs)
        ours = PeftModel.from_pretrained(make_model(kind), f"{tmp}/first", adapter_name="first")
        ours.load_adapter(f"{tmp}/second", adapter_name="second")
    mixed = run(ours.eval(), inputs, adapter_names=list(names))
    for row, name in enumerate(names):
        diff = max_abs_diff(mixed[row], expected[name][row])
        assert diff <= tolerance, f"mixed row {row} ({name}) vs HF single-adapter run: {diff:.2e}"


def check_seq_cls_cross_load(our_config: Callable[[], Any], hf_config: Callable[[], Any], folder: Any,
                             tolerance: float = 1e-5, saved_keys: Sequence[str] | None = None) -> None:
    """Sequence classification on tiny BERT, both ways: HF saves → ours loads (equal logits and
    loss), ours saves → HF loads; the classifier head is saved in full as ``base_model.classifier.*``
    (exactly ``saved_keys`` when given) and trains, and ``disable_adapter`` gives the base model.
    Our own checks run first; HF peft's calls are under :func:`hf_oracle`, so an error HF raises ends
    the test as xfail with its message."""
    peft = hf_peft()
    from safetensors.torch import load_file

    from peft_kernel import PeftModel, get_peft_model

    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    inputs = dict(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
                  token_type_ids=torch.tensor([[0, 0, 1], [0, 1, 1]]), labels=torch.tensor([0, 2]))
    with hf_oracle("HF peft building and saving a SEQ_CLS adapter on BERT"):
        hf = peft.get_peft_model(make_model("bert"), hf_config())
        perturb(hf, 3, scale=0.5)
        hf.save_pretrained(f"{folder}/hf")
    ours = PeftModel.from_pretrained(make_model("bert"), f"{folder}/hf")
    assert type(ours).__name__ == "PeftModelForSequenceClassification"
    with torch.no_grad():
        b = ours(**inputs)
    ours.save_pretrained(f"{folder}/ours")
    saved = load_file(f"{folder}/ours/adapter_model.safetensors")
    assert {"base_model.classifier.bias", "base_model.classifier.weight"} <= set(saved)
    if saved_keys is not None:
        assert sorted(saved) == sorted(saved_keys)
    with ours.disable_adapter():
        assert torch.equal(run(ours, {"input_ids": ids}), run(make_model("bert"), {"input_ids": ids}))
    fresh = get_peft_model(make_model("bert"), our_config())
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} >= {
        "base_model.classifier.modules_to_save.default.weight", "base_model.classifier.modules_to_save.default.bias"}
    with hf_oracle("HF peft's forward on the SEQ_CLS adapter it saved"):
        hf = peft.PeftModel.from_pretrained(make_model("bert"), f"{folder}/hf")
        with torch.no_grad():
            a = hf(**inputs)
    assert max_abs_diff(a.logits, b.logits) <= tolerance and abs(a.loss.item() - b.loss.item()) <= tolerance
    # HF loading ours is the check itself (HF ran its own adapter above): its errors are ours
    back = run(peft.PeftModel.from_pretrained(make_model("bert"), f"{folder}/ours"), inputs)
    assert max_abs_diff(back, run(ours, inputs)) <= tolerance


def check_active_adapters_against_hf(
    kind: str,
    hf_config: Callable[[], Any],
    our_config: Callable[[], Any],
    randomize: Callable[[nn.Module, int], None] = perturb,
    merge_tolerance: float = 1e-5,
) -> None:
    """Two adapters active at once compose as in HF peft; merging them keeps the output, unmerging
    restores it, and unloading gives the base model back."""
    peft = hf_peft()
    from peft_kernel import get_peft_model

    inputs = make_inputs(kind)
    ours = get_peft_model(make_model(kind), our_config(), adapter_name="first")
    ours.add_adapter("second", our_config())
    randomize(ours, 7)
    ours.set_adapter(["first", "second"])
    both = run(ours.eval(), inputs)
    ours.merge_adapter()
    torch.testing.assert_close(run(ours, inputs), both, atol=merge_tolerance, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(run(ours, inputs), both, atol=1e-5, rtol=0)
    with hf_oracle("HF peft running two active adapters"):
        hf = peft.get_peft_model(make_model(kind), hf_config(), adapter_name="first")
        hf.add_adapter("second", hf_config())
        randomize(hf, 7)
        hf.base_model.set_adapter(["first", "second"])
        expected = run(hf.eval(), inputs)
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(run(ours.unload(), inputs), run(make_model(kind), inputs), atol=1e-5, rtol=0)
