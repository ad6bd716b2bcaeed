"""``python -m benchmarks.compiled [--headline] [--rounds N] [--backend inductor]``

``torch.compile`` (CPU inductor) against eager, for one adapter and a mixed batch of 16 adapters,
at prefill and decode, on the quick shape of ``python -m benchmarks`` (``--headline``: the
headline shape). Timed as the main benchmark does: one thread, thread CPU time, variants
interleaved round by round, medians. Also reports the graphs compiled during the timed rounds
(after warm-up): 0 means switching ``adapter_names`` and calls did not recompile.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any, Callable

import torch
from torch._dynamo.utils import counters

from benchmarks.__main__ import Decoder, interleaved, make_cache, scenario_names
from benchmarks.models import Shape, base_model, with_adapters

QUICK = Shape(hidden=128, layers=2, rank=8, rows=8, prompt=16, vocab=256)


def run(shape: Shape, rounds: int, backend: str, log: Callable[[str], None]) -> list[dict[str, Any]]:
    base = base_model(shape)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (shape.rows, shape.prompt), generator=gen)
    step = torch.randint(0, shape.vocab, (shape.rows, 1), generator=gen)
    cache = make_cache(base, ids)
    _, ours = with_adapters(base, shape, 16)
    ours.set_adapter("a0")
    compiled = torch.compile(ours, backend=backend)
    base_compiled = torch.compile(copy.deepcopy(base), backend=backend)
    rotations = [scenario_names(16, shape.rows)[k:] + scenario_names(16, shape.rows)[:k] for k in range(3)]
    rows = []
    for phase in ("prefill", "decode"):
        def call(model: torch.nn.Module, phase: str = phase, **kw: Any) -> Callable[[], Any]:
            if phase == "prefill":
                return lambda: model(input_ids=ids, use_cache=False, **kw).logits
            return Decoder(model, copy.deepcopy(cache), step, **kw)

        def rotating(model: torch.nn.Module) -> Callable[[], Any]:
            """A mixed batch whose rows change adapters on every call (same 16 adapters)."""
            calls = [call(model, adapter_names=names) for names in rotations]
            state = {"i": 0}

            def go() -> Any:
                state["i"] += 1
                return calls[state["i"] % len(calls)]()

            return go

        variants = {
            "base": call(base), "base/compiled": call(base_compiled),
            "single/eager": call(ours), "single/compiled": call(compiled),
            "mixed-16/eager": rotating(ours), "mixed-16/compiled": rotating(compiled),
        }
        reps = 1 if phase == "prefill" else 3
        with torch.inference_mode():
            started = time.perf_counter()
            for fn in variants.values():  # compile (and warm) every variant before counting graphs; twice
                for _ in range(2 * len(rotations)):  # each: a fresh cache holds normal tensors, later inference ones
                    fn()
            graphs = counters["stats"]["unique_graphs"]
            log(f"  {phase}: compiled and warmed in {time.perf_counter() - started:.0f} s")
            med = interleaved(variants, rounds, reps)
            recompiled = counters["stats"]["unique_graphs"] - graphs
            diff = {"single": float((call(ours)() - call(compiled)()).abs().max()),
                    "mixed-16": float((call(ours, adapter_names=rotations[1])() - call(compiled, adapter_names=rotations[1])())
                                      .abs().max())}
        for case in ("single", "mixed-16"):
            row = {
                "shape": shape.label(), "phase": phase, "case": case,
                "eager_vs_base": med[f"{case}/eager"] / med["base"],
                "compiled_vs_base": med[f"{case}/compiled"] / med["base"],
                "compiled_vs_compiled_base": med[f"{case}/compiled"] / med["base/compiled"],
                "speedup": med[f"{case}/eager"] / med[f"{case}/compiled"],
                "base_ms": med["base"] * 1e3, "base_compiled_ms": med["base/compiled"] * 1e3,
                "graphs_compiled_while_timed": recompiled, "max_abs_diff": diff[case],
            }
            rows.append(row)
            log(f"    {phase:8s} {case:9s} eager {row['eager_vs_base']:.2f}x base | compiled {row['compiled_vs_base']:.2f}x base "
                f"({row['compiled_vs_compiled_base']:.2f}x compiled base) | speed-up {row['speedup']:.2f}x | "
                f"recompiles {recompiled} | max |diff| {diff[case]:.1e}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compiled", description=__doc__.split("\n\n")[0])
    parser.add_argument("--headline", action="store_true", help="the headline shape instead of the quick one")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape = Shape() if args.headline else QUICK
    print(f"{shape.label()}: rows {shape.rows}, prompt {shape.prompt}, backend {args.backend}", flush=True)
    rows = run(shape, args.rounds, args.backend, lambda m: print(m, flush=True))
    print("\n| shape | phase | case | eager / base | compiled / base | compiled / compiled base | speed-up |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['phase']} | {r['case']} | {r['eager_vs_base']:.2f}x | {r['compiled_vs_base']:.2f}x | "
              f"{r['compiled_vs_compiled_base']:.2f}x | {r['speedup']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
