"""Under ``torchrun --nproc_per_node=2`` (gloo, CPU), one launch for two checks (torchrun and the
imports cost most of the time):

1. ``peft-kernel finetune --fsdp ...`` (the arguments after OUT), through ``ddp_driver``'s recording
   of saves and trained adapters;
2. in the same processes and process group: a LoRA model on the demo's tiny Llama sharded with FSDP2
   (``shard_peft_model``: each decoder layer, then the root), trained two steps, its full state dict
   gathered on every rank, then rank 0 saves the adapter with ``save_pretrained(OUT/adapter,
   state_dict=full)`` and the gathered weights in ``OUT/full.pt``.

Usage: ``fsdp_driver.py OUT finetune --fsdp ...``."""

import os
import sys

import torch
import torch.distributed as dist

from peft_kernel import LoraConfig, get_peft_model
from peft_kernel_demo.train import build_base_model
from peft_kernel_finetune.fsdp import gather_full_state_dict, is_sharded, shard_peft_model

TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]


def shard_and_save(out: str) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model = get_peft_model(build_base_model(50, seed=0),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    shard_peft_model(model)
    assert is_sharded(model)
    from torch.distributed.fsdp import FSDPModule

    sharded = sorted(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule))
    assert sharded.count("FSDPLlamaDecoderLayer") == 2 and len(sharded) == 3, sharded
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    for _ in range(2):
        ids = torch.randint(2, 50, (2, 8), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    full = gather_full_state_dict(model, cpu_offload=False)  # every rank: the same full tensors
    lora = sorted(k for k in full if "lora_" in k)
    assert lora and all(not hasattr(full[k], "placements") for k in full)
    if rank == 0:
        model.save_pretrained(os.path.join(out, "adapter"), state_dict=full)
        torch.save(full, os.path.join(out, "full.pt"))
    # both ranks gathered the same weights
    checksum = torch.tensor([float(sum(full[k].double().sum() for k in lora))], dtype=torch.float64)
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    assert all(torch.equal(c, gathered[0]) for c in gathered)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import ddp_driver  # noqa: F401  (records saves and trained adapters; the script's folder is on sys.path)
    from peft_kernel.cli import main

    code = main(sys.argv[2:])
    if code == 0:
        shard_and_save(sys.argv[1])
    sys.exit(code)
