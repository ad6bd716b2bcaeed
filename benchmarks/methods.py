"""``python -m benchmarks --methods`` (or ``python -m benchmarks.methods [--quick] [--only dora oft]``): every additive / multiplicative method, ours vs HF ``peft``.

Per method, at a Llama shape: the plain base model, HF with one adapter (``single``), ours with
the same adapter, ours with a mixed batch of 4 adapters (``adapter_names`` spreads the rows over
them) and, where HF runs it, HF's mixed batch. Decode (one token per row on a KV cache) and
prefill; ``time.thread_time`` of interleaved rounds, medians (see ``benchmarks.__main__``). The
headline ratio is ``ours mixed-4 / HF single`` (issue 18's target: <= 1.15 at decode). Every
adapter's weights are perturbed away from their identity init, then copied from HF into ours;
``diff_single`` is the max |logit difference| ours vs HF with one adapter, ``diff_mixed`` the max
over rows of ours mixed vs HF single with that row's adapter (prefill).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch

from benchmarks.__main__ import Decoder, interleaved, make_cache
from benchmarks.models import Shape, base_model

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = [*ATTN, "gate_proj", "up_proj", "down_proj"]
MIX = 4


def method_configs(shape: Shape) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{label: (config class name, kwargs)}`` at ``shape`` (block sizes divide every target)."""
    g = min(32, math.gcd(shape.hidden, shape.intermediate))
    return {
        "lora": ("LoraConfig", {"r": 8, "lora_alpha": 16, "target_modules": ALL}),
        "dora": ("LoraConfig", {"r": 8, "lora_alpha": 16, "use_dora": True, "target_modules": ALL}),
        "loha": ("LoHaConfig", {"r": 8, "alpha": 16, "target_modules": ALL}),
        "lokr": ("LoKrConfig", {"r": 8, "alpha": 16, "target_modules": ALL}),
        "ia3": ("IA3Config", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
        "oft": ("OFTConfig", {"oft_block_size": g, "target_modules": ALL}),
        "boft": ("BOFTConfig", {"boft_block_size": 8, "boft_n_butterfly_factor": 1, "target_modules": ATTN}),
        "hra": ("HRAConfig", {"r": 8, "target_modules": ALL}),
        "vera": ("VeraConfig", {"r": 16, "target_modules": ALL}),
        "randlora": ("RandLoraConfig", {"r": 8, "target_modules": ALL}),
        "vblora": ("VBLoRAConfig", {"r": 4, "num_vectors": 64, "vector_length": g, "target_modules": ALL}),
        "fourierft": ("FourierFTConfig", {"n_frequency": 256, "target_modules": ALL}),
        "waveft": ("WaveFTConfig", {"n_frequency": 256, "target_modules": ALL}),
        "c3a": ("C3AConfig", {"block_size": g, "target_modules": ALL}),
        "shira": ("ShiraConfig", {"r": 8, "target_modules": ALL}),
        "delora": ("DeloraConfig", {"r": 8, "target_modules": ALL}),
        "miss": ("MissConfig", {"r": g, "target_modules": ALL}),
        "adalora": ("AdaLoraConfig", {"r": 8, "init_r": 8, "total_step": 100, "target_modules": ALL}),
        "road": ("RoadConfig", {"group_size": g, "target_modules": ALL}),
        "osf": ("OSFConfig", {"target_modules": ATTN}),
    }


def _perturb(model: torch.nn.Module, adapter: str, seed: int) -> None:
    """Move ``adapter``'s floating parameters off their (often identity) init, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if adapter in name.split(".") and p.is_floating_point() and "ranknum" not in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def build(base: torch.nn.Module, cls: str, kwargs: dict[str, Any], count: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(HF model, our model), each with adapters a0..a{count-1}; ours gets HF's weights."""
    import peft

    import peft_kernel as pk

    hf = peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls)(**kwargs), adapter_name="a0")
    ours = pk.get_peft_model(copy.deepcopy(base), getattr(pk, cls)(**kwargs), adapter_name="a0")
    for i in range(1, count):  # inference_mode: AdaLoRA holds one trainable adapter only
        hf.add_adapter(f"a{i}", getattr(peft, cls)(**kwargs, inference_mode=True))
        ours.add_adapter(f"a{i}", getattr(pk, cls)(**kwargs, inference_mode=True))
    for i in range(count):
        _perturb(hf, f"a{i}", seed=i)
        state = peft.get_peft_model_state_dict(hf, adapter_name=f"a{i}")
        pk.set_peft_model_state_dict(ours, state, adapter_name=f"a{i}")
    for model in (hf, ours):
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        model.base_model.set_adapter("a0")
    return hf, ours


def _mixed_diff(hf: torch.nn.Module, ours: torch.nn.Module, ids: torch.Tensor, names: list[str]) -> float:
    got = ours(input_ids=ids, use_cache=False, adapter_names=names).logits
    worst = 0.0
    for adapter in sorted(set(names)):
        hf.base_model.set_adapter(adapter)
        want = hf(input_ids=ids, use_cache=False).logits
        rows = [i for i, n in enumerate(names) if n == adapter]
        worst = max(worst, float((got[rows] - want[rows]).abs().max()))
    hf.base_model.set_adapter("a0")
    return worst


def bench_method(label: str, cls: str, kwargs: dict[str, Any], base: torch.nn.Module, shape: Shape,
                 phases: list[str], rounds: int, decode_reps: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    hf, ours = build(base, cls, kwargs, MIX)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (shape.rows, shape.prompt), generator=gen)
    step = torch.randint(0, shape.vocab, (shape.rows, 1), generator=gen)
    cache = make_cache(base, ids)
    names = [f"a{i % MIX}" for i in range(shape.rows)]
    rows = []
    with torch.inference_mode():
        diff_single = float((hf(input_ids=ids, use_cache=False).logits
                             - ours(input_ids=ids, use_cache=False).logits).abs().max())
        diff_mixed = _mixed_diff(hf, ours, ids, names)
        for phase in phases:
            def call(model: torch.nn.Module, phase: str = phase, **kw: Any) -> Callable[[], Any]:
                if phase == "prefill":
                    return lambda: model(input_ids=ids, use_cache=False, **kw).logits
                return Decoder(model, copy.deepcopy(cache), step, **kw)

            variants = {"base": call(base), "hf_single": call(hf), "ours_single": call(ours),
                        "ours_mixed": call(ours, adapter_names=names)}
            # on a copy: HF leaves its adapter_names hooks on the model when it refuses a batch
            hf_mixed = call(copy.deepcopy(hf), adapter_names=names)
            try:
                hf_mixed()
                variants["hf_mixed"] = hf_mixed
            except Exception as exc:  # noqa: BLE001 - HF refuses mixed batches for some methods
                log(f"    HF mixed batch refused: {type(exc).__name__}: {str(exc)[:80]}")
            med = interleaved(variants, rounds, 1 if phase == "prefill" else decode_reps)
            row = {"method": label, "shape": shape.label(), "phase": phase, "rows": shape.rows,
                   "diff_single": diff_single, "diff_mixed": diff_mixed,
                   **{f"{k}_ms": v * 1e3 for k, v in med.items()},
                   "mixed_vs_hf_single": med["ours_mixed"] / med["hf_single"],
                   "single_vs_hf_single": med["ours_single"] / med["hf_single"],
                   "hf_single_vs_base": med["hf_single"] / med["base"]}
            if "hf_mixed" in med:
                row["hf_mixed_vs_hf_single"] = med["hf_mixed"] / med["hf_single"]
            rows.append(row)
            log("    " + format_row(row))
    return rows


def format_row(row: dict[str, Any]) -> str:
    hf_mixed = row.get("hf_mixed_vs_hf_single")
    return (f"{row['method']:9s} {row['phase']:7s} base {row['base_ms']:7.2f} ms | HF single/base "
            f"{row['hf_single_vs_base']:5.2f}x | ours single/HF {row['single_vs_hf_single']:5.2f} | "
            f"ours mixed-{MIX}/HF single {row['mixed_vs_hf_single']:5.2f} | HF mixed/HF single "
            + ("  -  " if hf_mixed is None else f"{hf_mixed:5.2f}")
            + f" | diff {row['diff_single']:.1e} / {row['diff_mixed']:.1e}")


def bench_methods(shape: Shape, phases: list[str], rounds: int, decode_reps: int, log: Callable[[str], None],
                  only: list[str] | None = None) -> list[dict[str, Any]]:
    """Every method of :func:`method_configs` (or ``only``) at ``shape``; a method that fails to
    build or run is logged and reported with its error."""
    base = base_model(shape)
    rows: list[dict[str, Any]] = []
    for label, (cls, kwargs) in method_configs(shape).items():
        if only and label not in only:
            continue
        try:
            rows += bench_method(label, cls, kwargs, base, shape, phases, rounds, decode_reps, log)
        except Exception as exc:  # noqa: BLE001 - one method's failure must not end the run
            log(f"    {label}: {type(exc).__name__}: {exc}")
            rows.append({"method": label, "shape": shape.label(), "error": f"{type(exc).__name__}: {exc}"})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [f"| method | shape | phase | base ms | HF single / base | ours single / HF single | ours mixed-{MIX} / HF single "
             f"| HF mixed-{MIX} / HF single | max diff single / mixed |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['shape']} | - | error: {r['error'][:80]} | | | | | |")
            continue
        hf_mixed = r.get("hf_mixed_vs_hf_single")
        lines.append(f"| {r['method']} | {r['shape']} | {r['phase']} | {r['base_ms']:.2f} | {r['hf_single_vs_base']:.2f}x | "
                     f"{r['single_vs_hf_single']:.2f} | {r['mixed_vs_hf_single']:.2f} | "
                     + ("refused" if hf_mixed is None else f"{hf_mixed:.2f}")
                     + f" | {r['diff_single']:.1e} / {r['diff_mixed']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.methods")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape, phases, rounds, reps = plan(args.quick, args.rounds)
    rows = bench_methods(shape, phases, rounds, reps, lambda m: print(m, flush=True), args.only)
    print("\n" + markdown(rows))
    return 0


def plan(quick: bool, rounds: int | None) -> tuple[Shape, list[str], int, int]:
    """(shape, phases, rounds, decode steps per round): hidden 512 / 2 layers, or a tiny decode-only
    run for ``--quick``."""
    if quick:
        return Shape(hidden=128, layers=1, rank=8, rows=16, prompt=8, vocab=256), ["decode"], rounds or 2, 2
    return Shape(hidden=512, layers=2, rank=8, rows=16, prompt=64, vocab=1024), ["decode", "prefill"], rounds or 5, 5


if __name__ == "__main__":
    raise SystemExit(main())
