"""``python -m benchmarks [--quick] [--out bench-results] [--strategies]``

For each shape: the plain base model, HF ``peft`` and peft-kernel, timed side by side in one
process with ``time.thread_time`` (CPU time of this thread) and ``torch.set_num_threads(1)``;
variants interleaved round by round, medians reported. Scenarios: one adapter, adapters disabled,
mixed batches of 2 / 16 / 64 adapters (16 rows: mixed-64 holds 64 adapters of which 16 are used);
prefill (``prompt`` tokens per row) and decode (one token per row on a KV cache of ``prompt``).
Shapes: the headline (hidden 512, 4 layers, r 16), a sweep of ranks and widths, and a scaling pair
(hidden 2048, 2 layers, r 8 and r 64). Then the time to load the 1st..100th adapter, and memory.
Writes JSON and a PNG chart.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.memory import peak_bytes, resident_bytes
from benchmarks.models import Shape, base_model, flops_per_token, lora_config, with_adapters


def timed(fn: Callable[[], Any], reps: int) -> float:
    start = time.thread_time()
    for _ in range(reps):
        fn()
    return (time.thread_time() - start) / reps


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each variant; every round runs every variant once, in turn."""
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up (stacks, plans, allocator)
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in variants.items():
                samples[name].append(timed(fn, reps))
    finally:
        gc.enable()
    return {k: statistics.median(v) for k, v in samples.items()}


class Decoder:
    """One decode step of ``rows`` tokens on a KV cache of ``prompt`` tokens, restored after."""

    def __init__(self, model: torch.nn.Module, cache: Any, step: torch.Tensor, **kwargs: Any) -> None:
        self.model, self.cache, self.step, self.kwargs = model, cache, step, kwargs

    def __call__(self) -> Any:
        out = self.model(input_ids=self.step, past_key_values=self.cache, use_cache=True, **self.kwargs)
        self.cache.crop(-1)
        return out.logits


def make_cache(base: torch.nn.Module, ids: torch.Tensor) -> Any:
    with torch.no_grad():
        return base(input_ids=ids, use_cache=True).past_key_values


def scenario_names(count: int, rows: int) -> list[str]:
    return [f"a{(i * count) // rows if count > rows else i % count}" for i in range(rows)]


def bench_shape(shape: Shape, mixes: list[int], phases: list[str], rounds: int, decode_reps: int,
                strategies: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    from peft_kernel_lowrank import mixed

    base = base_model(shape)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (shape.rows, shape.prompt), generator=gen)
    step = torch.randint(0, shape.vocab, (shape.rows, 1), generator=gen)
    cache = make_cache(base, ids)
    models = {n: with_adapters(base, shape, n) for n in sorted(set(mixes) | {2})}
    rows: list[dict[str, Any]] = []
    for phase in phases:
        context = shape.prompt if phase == "prefill" else shape.prompt + 1
        tokens = shape.rows * (shape.prompt if phase == "prefill" else 1)
        base_flops, lora_flops = flops_per_token(shape, context)
        floor = 1 + lora_flops / base_flops

        def call(model: torch.nn.Module, phase: str = phase, **kw: Any) -> Callable[[], Any]:
            if phase == "prefill":
                return lambda: model(input_ids=ids, use_cache=False, **kw).logits
            return Decoder(model, copy.deepcopy(cache), step, **kw)

        reps = 1 if phase == "prefill" else decode_reps
        hf2, ours2 = models[2]
        hf2.base_model.set_adapter("a0")
        ours2.set_adapter("a0")
        cases: list[tuple[str, dict[str, Callable[[], Any]]]] = [
            ("single", {"hf": call(hf2), "ours": call(ours2)}),
        ]

        def disabled(model: torch.nn.Module) -> Callable[[], Any]:
            inner = call(model)

            def run() -> Any:
                with model.disable_adapter():
                    return inner()

            return run

        cases.append(("disabled", {"hf": disabled(hf2), "ours": disabled(ours2)}))
        for n in mixes:
            hf, ours = models[n]
            names = scenario_names(n, shape.rows)
            variants = {"hf": call(hf, adapter_names=names), "ours": call(ours, adapter_names=names)}
            if strategies:
                for s in ("bmm", "concat", "slots", "grouped", "loop"):
                    variants[f"ours[{s}]"] = _with_strategy(mixed, s, call(ours, adapter_names=names))
            cases.append((f"mixed-{n}", variants))
        all_variants: dict[str, Callable[[], Any]] = {"base": call(base)}
        for case, variants in cases:
            for k, fn in variants.items():
                all_variants[f"{case}/{k}"] = fn
        with torch.inference_mode():
            log(f"  {shape.label()} {phase}: {len(all_variants)} variants x {rounds} rounds")
            med = interleaved(all_variants, rounds, reps)
            check = {}
            for case, variants in cases:
                if "hf" in variants and "ours" in variants and case != "disabled":
                    a, b = variants["hf"](), variants["ours"]()
                    check[case] = float((a - b).abs().max())
            mem = {"base": peak_bytes(all_variants["base"])}
            for case, variants in cases:
                for k in ("hf", "ours"):
                    mem[f"{case}/{k}"] = peak_bytes(variants[k])
        for case, variants in cases:
            row: dict[str, Any] = {
                "shape": shape.label(), "hidden": shape.hidden, "rank": shape.rank, "rows": shape.rows,
                "prompt": shape.prompt, "phase": phase, "case": case, "tokens": tokens,
                "base_ms": med["base"] * 1e3, "flop_floor": floor if case != "disabled" else 1.0,
                "max_abs_diff_vs_hf": check.get(case),
                "peak_mb": {"base": mem["base"] / 2**20, **{k: mem[f"{case}/{k}"] / 2**20 for k in ("hf", "ours")}},
            }
            for k in variants:
                row[f"{k}_ms"] = med[f"{case}/{k}"] * 1e3
                row[f"{k}_vs_base"] = med[f"{case}/{k}"] / med["base"]
            row["ours_vs_hf"] = med[f"{case}/ours"] / med[f"{case}/hf"]
            rows.append(row)
            log("    " + format_row(row))
    resident = {f"mixed-{n}": {"hf": resident_bytes(models[n][0]) / 2**20, "ours": resident_bytes(models[n][1]) / 2**20}
                for n in models}
    for row in rows:
        if row["case"] in resident:
            row["resident_mb"] = resident[row["case"]]
    return rows


def _with_strategy(mixed: Any, strategy: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        saved, mixed.strategy = mixed.strategy, strategy
        try:
            return fn()
        finally:
            mixed.strategy = saved

    return run


def format_row(row: dict[str, Any]) -> str:
    extra = "".join(f"  {k[:-7]} {row[k]:.2f}x" for k in row if k.startswith("ours[") and k.endswith("_vs_base"))
    return (f"{row['phase']:8s} {row['case']:9s} base {row['base_ms']:8.2f} ms | HF {row['hf_vs_base']:5.2f}x | "
            f"ours {row['ours_vs_base']:5.2f}x | ours/HF {row['ours_vs_hf']:5.2f} | floor {row['flop_floor']:.3f}{extra}")


def bench_loading(shape: Shape, count: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Seconds to ``load_adapter`` the 1st..``count``-th adapter (the same checkpoint, new names)."""
    import peft

    import peft_kernel as pk

    out: dict[str, Any] = {"shape": shape.label(), "count": count}
    with tempfile.TemporaryDirectory() as tmp:
        base = base_model(shape)
        for lib, name in ((peft, "hf"), (pk, "ours")):
            model = lib.get_peft_model(copy.deepcopy(base), lora_config(lib, shape), adapter_name="a0")
            folder = Path(tmp) / name
            model.save_pretrained(folder)
            times = []
            for i in range(1, count + 1):
                gc.collect()
                start = time.perf_counter()
                model.load_adapter(str(folder / "a0"), adapter_name=f"x{i}")
                times.append(time.perf_counter() - start)
            first, last = statistics.median(times[:5]), statistics.median(times[-5:])
            out[name] = {"seconds": times, "first5_ms": first * 1e3, "last5_ms": last * 1e3, "growth": last / first}
            log(f"  load {name:4s}: 1st-5th {first * 1e3:7.1f} ms, {count - 4}th-{count}th {last * 1e3:7.1f} ms "
                f"({last / first:.2f}x)")
            del model
    return out


def chart(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results["rows"] if r["shape"] == results["headline"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, phase in zip(axes[:2], ("prefill", "decode")):
        sel = [r for r in rows if r["phase"] == phase]
        xs = range(len(sel))
        ax.bar([x - 0.2 for x in xs], [r["hf_vs_base"] for r in sel], 0.4, label="HF peft")
        ax.bar([x + 0.2 for x in xs], [r["ours_vs_base"] for r in sel], 0.4, label="peft-kernel")
        ax.scatter(list(xs), [r["flop_floor"] for r in sel], marker="_", s=400, color="black", label="FLOP floor", zorder=3)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(list(xs), [r["case"] for r in sel])
        ax.set_title(f"{results['headline']} {phase}: time / base model")
        ax.legend()
    load = results.get("loading")
    if load:
        ax = axes[2]
        for name, label in (("hf", "HF peft"), ("ours", "peft-kernel")):
            ax.plot(range(1, load["count"] + 1), [s * 1e3 for s in load[name]["seconds"]], label=label)
        ax.set_xlabel("adapter #")
        ax.set_ylabel("load_adapter ms")
        ax.set_title("loading the n-th adapter")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def markdown(results: dict[str, Any]) -> str:
    lines = ["| shape | phase | case | base ms | HF / base | ours / base | ours / HF | FLOP floor | peak MB base / HF / ours |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results["rows"]:
        p = r["peak_mb"]
        lines.append(f"| {r['shape']} | {r['phase']} | {r['case']} | {r['base_ms']:.2f} | {r['hf_vs_base']:.2f}x | "
                     f"{r['ours_vs_base']:.2f}x | {r['ours_vs_hf']:.2f} | {r['flop_floor']:.3f} | "
                     f"{p['base']:.1f} / {p['hf']:.1f} / {p['ours']:.1f} |")
    strat = [r for r in results["rows"] if any(k.startswith("ours[") for k in r)]
    if strat:
        lines += ["", "| shape | phase | case | " + " | ".join(f"ours[{s}] / base" for s in ("bmm", "concat", "slots", "grouped", "loop")) + " |",
                  "|---|---|---|" + "---:|" * 5]
        for r in strat:
            lines.append(f"| {r['shape']} | {r['phase']} | {r['case']} | "
                         + " | ".join(f"{r[f'ours[{s}]_vs_base']:.2f}x" for s in ("bmm", "concat", "slots", "grouped", "loop")) + " |")
    load = results.get("loading")
    if load:
        lines += ["", "| adapter load | 1st-5th ms | 96th-100th ms | growth |", "|---|---:|---:|---:|"]
        for name in ("hf", "ours"):
            lines.append(f"| {name} | {load[name]['first5_ms']:.1f} | {load[name]['last5_ms']:.1f} | {load[name]['growth']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, 2 rounds, 10 loads")
    parser.add_argument("--out", default="bench-results", help="folder for results.json / results.png / results.md")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per shape (median taken)")
    parser.add_argument("--strategies", action="store_true", help="also time each mixed-batch kernel at the headline shape")
    parser.add_argument("--methods", action="store_true", help="also every method's mixed-4 batch vs HF single (benchmarks/methods.py)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["headline", "sweep", "scaling", "loading", "methods"],
                        help="parts to leave out (--quick runs the methods part at a tiny shape)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    started = time.perf_counter()
    if args.quick:
        headline = Shape(hidden=128, layers=2, rank=8, rows=8, prompt=16, vocab=256)
        plan = [] if "headline" in args.skip else [(headline, [2, 16], ["prefill", "decode"], args.rounds or 2, 3, args.strategies)]
        load_shape, load_count = Shape(hidden=128, layers=2, rank=8), 10
    else:
        headline = Shape()
        rounds = args.rounds or 5
        plan = [] if "headline" in args.skip else [(headline, [2, 16, 64], ["prefill", "decode"], rounds, 5, args.strategies)]
        if "sweep" not in args.skip:
            for shape in (Shape(rank=8, prompt=32), Shape(rank=64, prompt=32), Shape(hidden=1024, prompt=16)):
                plan.append((shape, [16], ["prefill", "decode"], max(3, rounds - 2), 3, False))
        if "scaling" not in args.skip:  # a wider model, low and high rank: how the overheads scale
            for rank in (8, 64):
                plan.append((Shape(hidden=2048, layers=2, rank=rank, prompt=16), [16], ["prefill", "decode"], 3, 3, False))
        load_shape, load_count = headline, 100
    results: dict[str, Any] = {
        "headline": headline.label(),
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()},
        "rows": [],
    }
    try:
        import peft

        results["machine"]["peft"] = peft.__version__
    except ImportError:
        pass
    for shape, mixes, phases, rounds, decode_reps, strategies in plan:
        log(f"{shape.label()}: rows {shape.rows}, prompt {shape.prompt}")
        results["rows"] += bench_shape(shape, mixes, phases, rounds, decode_reps, strategies, log)
    if "loading" not in args.skip:
        log("adapter loading")
        results["loading"] = bench_loading(load_shape, load_count, log)
    if (args.methods or args.quick) and "methods" not in args.skip:
        from benchmarks import methods

        shape, phases, rounds, reps = methods.plan(args.quick, args.rounds)
        log(f"methods at {shape.label()}: ours mixed-{methods.MIX} vs HF single")
        results["methods"] = methods.bench_methods(shape, phases, rounds, reps, log)
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    if "methods" in results:
        from benchmarks import methods

        table += "\n\n" + methods.markdown(results["methods"])
    (out / "results.md").write_text(table + "\n")
    drew = chart(results, out / "results.png")
    log("\n" + table)
    log(f"\nwrote {out / 'results.json'}, {out / 'results.md'}" + (f", {out / 'results.png'}" if drew else " (no matplotlib: no chart)")
        + f" in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
