"""Entry module of peft-kernel-finetune: adds ``peft-kernel finetune`` to the CLI.

Cheap to import: the options are plain argparse; torch, transformers and the training job load
only when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from peft_kernel.plugin_api import hookimpl

DESCRIPTION = """\
Train an adapter of any installed PEFT method with transformers' Trainer.

With no arguments: a LoRA adapter on an embedded tiny Llama and bundled data (about a minute on
two CPU cores). With --model and --data: your causal LM on your data. Under torchrun the same
command runs distributed data parallel (gloo on CPU, NCCL on GPUs) and writes the output once:

  torchrun --nproc_per_node=2 "$(command -v peft-kernel)" finetune --output out

The output folder holds the adapter as HF PEFT writes it (adapter_config.json,
adapter_model.safetensors; PeftModel.from_pretrained and `peft-kernel inspect` open it),
metrics.json, loss.png and checkpoints/ (adapter-only Trainer checkpoints, for --resume).
"""


def run(args: argparse.Namespace) -> int:
    from peft_kernel_finetune.job import run_from_args

    return run_from_args(args)


@hookimpl
def peft_kernel_register_commands(subparsers: Any) -> None:
    from peft_kernel_finetune.options import add_arguments

    parser = subparsers.add_parser(
        "finetune", help="train an adapter (any installed method) on a model and data, with transformers' Trainer",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
