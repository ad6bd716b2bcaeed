"""Measure serving non-LoRA adapters through convert_to_lora on CPU (Llama h512, 4 layers).

    HF_HUB_OFFLINE=1 python plugins/qaic/scripts/measure_conversion.py

Saves a LoHa, a LoKr and a VeRA adapter with HF PEFT, loads each into
``QEffAutoLoraModelForCausalLM`` at several ``convert_rank`` values (load + SVD time, worst
per-layer relative error), exports one graph with all three at rank 16 and compares every row of a
mixed batch with HF PEFT's own ``convert_to_lora`` of the same adapters (ONNX Runtime logits).
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from measure import bigger_llama  # noqa: E402

from peft_kernel_qaic import QEffAutoLoraModelForCausalLM  # noqa: E402

PROMPTS = [[1, *range(10, 40)], [1, 7, 8, 9], [1, *range(100, 120)]]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def save(model, folder, config, seed):
    from peft import get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    pm.save_pretrained(str(folder))
    return pm.eval()


def hf_converted(pm, model, rank):
    from peft import convert_to_lora, get_peft_model, set_peft_model_state_dict

    config, state_dict = convert_to_lora(pm, rank)
    lora = get_peft_model(copy.deepcopy(model), config)
    set_peft_model_state_dict(lora, state_dict)
    return lora.eval()


def main():
    from peft import LoHaConfig, LoKrConfig, VeraConfig

    torch.set_num_threads(2)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (timings scale with it)")
    model = bigger_llama()
    tmp = Path(tempfile.mkdtemp(prefix="qaic-conv-"))
    configs = {"loha": LoHaConfig(r=8, alpha=8, target_modules=TARGETS),
               "lokr": LoKrConfig(r=8, alpha=8, target_modules=TARGETS),
               "vera": VeraConfig(r=32, target_modules=["q_proj", "v_proj"])}
    hf = {name: save(model, tmp / name, cfg, i) for i, (name, cfg) in enumerate(configs.items())}
    for name in configs:
        for rank in (8, 16, 32):
            qeff = QEffAutoLoraModelForCausalLM.from_pretrained(model)
            t = time.perf_counter()
            qeff.load_adapter(tmp / name, name, convert_rank=rank)
            report = qeff.conversion_report[name]
            print(f"{name} rank {rank:2d}: load + convert {time.perf_counter() - t:5.2f}s, {len(report.errors)} layers, "
                  f"worst relative error {report.worst:.3f}")
    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(model)
    for name in configs:
        qeff.load_adapter(tmp / name, name, convert_rank=16)
    t = time.perf_counter()
    qeff.export(tmp / "export", batch_size=3, prefill_seq_len=16, ctx_len=64)
    print(f"export with 3 converted adapters (rank 16): {time.perf_counter() - t:.2f}s")
    mapping = list(configs)
    res = qeff.generate(prompt_token_ids=PROMPTS, prompt_to_adapter_mapping=mapping, generation_len=8,
                        runtime="onnxruntime", return_logits=True)
    for i, name in enumerate(mapping):
        oracle = hf_converted(hf[name], model, 16)
        full = torch.tensor([PROMPTS[i] + res.generated_ids[i]])
        with torch.no_grad():
            ref = oracle(full).logits[0, len(PROMPTS[i]) - 1 : len(PROMPTS[i]) - 1 + 8].numpy()
        print(f"{name}: max |ORT - HF convert_to_lora| logits {np.abs(ref - res.logits[i]).max():.1e} "
              f"(max |logit| {np.abs(ref).max():.1f}), greedy {'match' if ref.argmax(-1).tolist() == res.generated_ids[i] else 'DIFFER'}")


if __name__ == "__main__":
    main()
