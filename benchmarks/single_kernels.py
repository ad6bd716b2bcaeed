"""``python -m benchmarks.single_kernels [--rounds N]``: one adapted linear layer, the kernel choices
of the single-adapter path (``peft_kernel_lowrank.single``) side by side.

Per ``(in, out)`` of the headline model's projections and per token count: the base GEMM alone,
``thin`` (base GEMM, shrink GEMM ``x·Aᵀ``, ``addmm_`` of ``B``: the decode path), ``fold`` (one GEMM
against ``W + s·B·A`` built per call: the prefill path past ``FOLD_RATIO``) and ``[W; A]`` (one GEMM
against the weight and ``A`` stacked, then ``addmm_``: the issue's suggestion, measured, not used).
Ratios to the base GEMM; ``time.thread_time``, one thread, interleaved rounds, medians (see
``benchmarks.__main__``). Also prints where ``single`` folds.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.__main__ import interleaved
from peft_kernel_lowrank.single import FOLD_RATIO

SHAPES = ((512, 512), (512, 1376), (1376, 512))
TOKENS = (16, 256, 1024)
RANK = 16


def variants(d_in: int, d_out: int, tokens: int) -> dict[str, Callable[[], torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(tokens, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen)
    a, b = torch.randn(RANK, d_in, generator=gen), torch.randn(d_out, RANK, generator=gen)
    stacked = torch.cat([w, a])

    def thin() -> torch.Tensor:
        y = F.linear(x, w)
        return y.addmm_(F.linear(x, a), b.t(), alpha=2.0)

    def joint() -> torch.Tensor:
        both = F.linear(x, stacked)
        return both[:, :d_out].addmm_(both[:, d_out:], b.t(), alpha=2.0)  # a strided view of the joint output

    return {"base": lambda: F.linear(x, w), "thin": thin,
            "fold": lambda: F.linear(x, torch.addmm(w, b, a, alpha=2.0)), "[W; A]": joint}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.single_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| in -> out | tokens | thin / base | fold / base | [W; A] / base | single folds |")
    print("|---|---:|---:|---:|---:|---|")
    for d_in, d_out in SHAPES:
        for tokens in TOKENS:
            reps = max(1, int(2e8 / (tokens * d_in * d_out)))
            times = interleaved(variants(d_in, d_out, tokens), args.rounds, reps)
            ratio = {k: v / times["base"] for k, v in times.items()}
            folds = tokens * (d_in + d_out) >= FOLD_RATIO * d_in * d_out
            print(f"| {d_in} -> {d_out} | {tokens} | {ratio['thin']:.3f} | {ratio['fold']:.3f} | {ratio['[W; A]']:.3f} | "
                  f"{'yes' if folds else 'no'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
