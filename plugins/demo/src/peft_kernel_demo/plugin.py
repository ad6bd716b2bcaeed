"""Entry module of peft-kernel-demo: adds ``peft-kernel demo`` to the CLI.

Cheap to import: the options are plain argparse; torch, transformers and the demo load only when
the command runs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from peft_kernel.plugin_api import hookimpl


def run(args: argparse.Namespace) -> int:
    """``peft-kernel demo``: check the options, run the demo, print the table (or ``--json``)."""
    from peft_kernel.plugin_api import CliError
    from peft_kernel_demo.run import format_report, run_demo

    if args.steps < 1:
        raise CliError(f"--steps must be at least 1, got {args.steps}")
    if args.rank < 1:
        raise CliError(f"--rank must be at least 1, got {args.rank}")
    result = run_demo(steps=args.steps, seed=args.seed, output_dir=args.output_dir, rank=args.rank, lr=args.lr,
                      threads=args.threads, progress=not args.no_progress)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=False, default=str))
    else:
        print(format_report(result))
    return 0


@hookimpl
def peft_kernel_register_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="train two LoRA adapters on a tiny built-in model and serve a mixed batch")
    p.add_argument("--steps", type=int, default=200, help="training steps per adapter (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base model, adapters and batches (default 0)")
    p.add_argument("--output-dir", default="demo-output", help="where the adapters are saved (default ./demo-output)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the model is tiny, more threads only add overhead)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)
