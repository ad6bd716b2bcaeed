"""Seeded, bounded fuzzing of adapter configs: every bad input gets a named error.

For every installed method's config class, mutations of a valid ``adapter_config.json`` (wrong
types, out-of-range and huge sizes, invalid regexes, broken JSON files, non-objects, deep nesting,
non-UTF-8 bytes, huge integers...) go through ``PeftConfig.from_pretrained`` / ``from_dict``; a
config that loads is then injected into a tiny model and run forward once. Each case must either
work or raise a peft-kernel error (:class:`peft_kernel.errors.PeftKernelError`); any other
exception, or a case running past a time limit, fails the test with the offending input.

No new dependency: ``random.Random(seed)`` drives it. Run ``python tests/test_fuzz_configs.py
[cases] [seed]`` to print the counts.
"""

from __future__ import annotations

import copy
import json
import random
import signal
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import attrs
import torch

from peft_kernel import PeftConfig, get_peft_model
from peft_kernel.errors import PeftKernelError
from peft_kernel.plugins import get_registry
from peft_kernel_testing import make_inputs, make_model

CASES = 270
SEED = 1234
CASE_SECONDS = 5.0

BAD_REGEXES = ["(", "[a-", "*", "a{2,1}", "(?P<x>", "\\", "lin(0", "+lin0", "(?<=a+)b", "[z-a]"]
INTS = [0, -1, 1, 3, 16, 2**31, 10**30, -(2**63), 65537]
FLOATS = [0.5, -0.5, 1e308, float("nan"), float("inf"), float("-inf"), 2.5, 1.0]
STRINGS = ["", "lin0", "lin.*", "all-linear", "x" * 300, "\u00e9\u4e2d", *BAD_REGEXES]
PATTERN_FIELDS = ("target_modules", "exclude_modules", "layers_pattern", "feedforward_modules")
SIZE_FIELDS = ("r", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "encoder_hidden_size",
               "oft_block_size", "num_cayley_neumann_terms", "decompose_factor", "num_transformer_submodules")


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return rng.choice(INTS)
    if kind == 1:
        return rng.choice(FLOATS)
    if kind == 2:
        return rng.choice(STRINGS)
    if kind == 3:
        return None
    if kind == 4:
        return rng.choice([True, False])
    if kind == 5:
        return rng.choice(["lin0", "lin1", 7])
    if kind == 6:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    if kind == 7:
        return {rng.choice(["lin0", "lin1", *BAD_REGEXES]): _value(rng, depth + 1) for _ in range(rng.randrange(3))}
    return rng.choice([["lin0"], ["lin0", "lin1"], {"lin0": 4}, {"lin0": 0}, {"lin1": -2}, {"(": 2}, [[0, 1]]])


def _base(cls: type) -> dict[str, Any]:
    required = {f.name: f.metadata["example"] for f in attrs.fields(cls) if "example" in f.metadata}  # no default
    data = cls(**required).to_dict()
    names = {f.name for f in attrs.fields(cls)}
    if "target_modules" in names:
        data["target_modules"] = ["lin0", "lin1"]
    if "num_virtual_tokens" in names:
        data["num_virtual_tokens"] = 3
        data["task_type"] = "CAUSAL_LM"
    return data


def _mutate(rng: random.Random, cls: type, data: dict[str, Any]) -> tuple[str, Any]:
    """One case: ``("dict", data)`` for ``from_dict`` / ``from_pretrained``, or ``("bytes", raw)``
    written as ``adapter_config.json``."""
    fields = [f.name for f in attrs.fields(cls) if f.init and f.name != "peft_type"]
    kind = rng.randrange(12)
    if kind <= 3:  # one or a few fields set to anything
        for _ in range(rng.randrange(1, 4)):
            data[rng.choice(fields)] = _value(rng)
    elif kind == 4:  # sizes: zero, negative, huge
        present = [f for f in SIZE_FIELDS if f in fields] or fields
        data[rng.choice(present)] = rng.choice(INTS + [2**20, 10**6, "8", 8.0])
    elif kind == 5:  # regexes
        present = [f for f in PATTERN_FIELDS if f in fields]
        if present:
            data[rng.choice(present)] = rng.choice(BAD_REGEXES + ["lin[01]", ["(", "lin0"]])
        for name in ("rank_pattern", "alpha_pattern"):
            if name in fields and rng.random() < 0.5:
                data[name] = {rng.choice(BAD_REGEXES + ["lin0"]): rng.choice([0, -4, 2, 2**31, "2", 2.5])}
    elif kind == 6:  # the top level is not an object
        return "dict", rng.choice([[], [data], "LORA", 3, None, True, 2.5])
    elif kind == 7:  # broken files
        text = json.dumps(data)
        return "bytes", rng.choice([
            text[: rng.randrange(len(text))].encode(),
            b"\xff\xfe\x00garbage" + text.encode("utf-16"),
            text.encode("latin-1", "replace").replace(b"{", b"{\xe9\xff", 1),
            b"[" * 100_000 + b"]" * 100_000,
            ('{"r": ' + "9" * 5000 + "}").encode(),
            text.replace('"r": 8', '"r": ' + "1" * 5000).encode(),
            b"",
            b"\x00" * 16,
        ])
    elif kind == 8:  # peft_type
        data["peft_type"] = rng.choice([None, 3, "", "NOT_A_METHOD", ["LORA"], {"x": 1}, "lora"])
    elif kind == 9:  # unknown and weird keys
        data[rng.choice(["new_field", "", "\u2603", "r " * 10])] = _value(rng)
        data[rng.choice(fields)] = _value(rng)
    elif kind == 10:  # deep nesting inside a field
        nested: Any = "lin0"
        for _ in range(rng.choice([50, 5000, 100_000])):
            nested = [nested]
        data[rng.choice(fields)] = nested
    else:  # task type and values of the right type but out of range
        data[rng.choice(fields)] = rng.choice([-1, 0, 10**30, -0.5, 1e308, float("nan")])
        if rng.random() < 0.3:
            data["task_type"] = rng.choice(["SEQ_2_SEQ_LM", "CAUSAL_LM", "nope", 5])
    return "dict", data


class _Timeout(BaseException):
    pass


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: Any) -> None:
        raise _Timeout(f"ran for more than {seconds}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_PROMPT_BASE: dict[str, Any] = {}


def _use(config: Any) -> None:
    """Put a loaded config to work: inject it into a tiny model and run one forward."""
    if getattr(config, "is_prompt_learning", False):
        model = get_peft_model(copy.deepcopy(_PROMPT_BASE["llama"]), config)
        model(**make_inputs("llama"))
    else:
        model = get_peft_model(make_model("mlp"), config)
        model(**make_inputs("mlp"))


def run_case(cls: type, kind: str, payload: Any, folder: Path) -> tuple[str, str]:
    """``("ok" | "named" | "other", description)`` for one case."""
    folder.mkdir(parents=True, exist_ok=True)
    text = None
    if kind == "dict" and random.Random(str(folder)).random() < 0.5:
        try:
            text = json.dumps(payload)
        except (RecursionError, ValueError):  # too deep for json itself: use from_dict
            text = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _time_limit(CASE_SECONDS):
                if kind == "bytes":
                    (folder / "adapter_config.json").write_bytes(payload)
                    config = PeftConfig.from_pretrained(folder)
                elif text is not None:
                    (folder / "adapter_config.json").write_text(text)
                    config = PeftConfig.from_pretrained(folder)
                else:
                    config = PeftConfig.from_dict(payload)
                _use(config)
    except PeftKernelError as exc:
        return "named", f"{type(exc).__name__}: {exc}"[:300]
    except (Exception, _Timeout, RecursionError) as exc:  # noqa: B014 - the point is to catch all
        return "other", f"{type(exc).__name__}: {exc}"[:300]
    return "ok", ""


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except RecursionError:
        return "<nested too deep to show>"


def fuzz(cases: int = CASES, seed: int = SEED, folder: Path | None = None) -> list[tuple[str, str, str, str]]:
    """``(config class, outcome, error, input)`` for ``cases`` seeded cases spread over every method."""
    import tempfile

    if "llama" not in _PROMPT_BASE:  # built once, outside the per-case time limit
        _PROMPT_BASE["llama"] = make_model("llama")
    rng = random.Random(seed)
    classes = sorted((r.config_class for r in get_registry().methods.values()), key=lambda c: c.__name__)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(folder or tmp)
        for i in range(cases):
            cls = classes[i % len(classes)]
            kind, payload = _mutate(rng, cls, _base(cls))
            outcome, error = run_case(cls, kind, payload, root / f"case{i}")
            shown = _safe_repr(payload)
            results.append((cls.__name__, outcome, error, shown[:200] + ("..." if len(shown) > 200 else "")))
    return results


def test_every_bad_config_gets_a_named_error():
    torch.manual_seed(0)
    results = fuzz()
    others = [r for r in results if r[1] == "other"]
    assert sum(r[1] == "named" for r in results) > CASES // 3  # the fuzzer does reach the error paths
    assert not others, f"{len(others)} of {len(results)} cases raised an unnamed error, e.g.:\n" + "\n".join(
        f"  {cls}: {error}\n      input: {shown}" for cls, _, error, shown in others[:10]
    )


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else CASES
    s = int(sys.argv[2]) if len(sys.argv) > 2 else SEED
    results = fuzz(n, s)
    counts: dict[str, int] = {}
    for _, outcome, _, _ in results:
        counts[outcome] = counts.get(outcome, 0) + 1
    print(counts)
    kinds: dict[str, int] = {}
    for _cls, outcome, error, _shown in results:
        if outcome == "other":
            kinds[error.split(":")[0]] = kinds.get(error.split(":")[0], 0) + 1
    print(kinds)
    for cls, outcome, error, shown in results:
        if outcome == "other":
            print(f"{cls}: {error[:160]}\n    {shown[:160]}")
