"""The KV-cache write alone, before / after: one-hot matmul write vs ``ScatterND`` (ONNX Runtime, CPU).

    python plugins/qaic/scripts/kv_write_bench.py [--ctx 256,1024] [--repeats 50] [--threads 2]

Exports two one-op-family graphs that write new keys ``[batch, kv_heads, seq, head_dim]`` into a
cache ``[batch, kv_heads, ctx, head_dim]`` at ``position_ids`` (last row right-padded with ``-1``):
``onehot`` is the write the graph used before (``where(written, one_hot^T @ new, cache)``),
``scatter`` is :func:`peft_kernel_qaic.kv_cache.write_kv` (``GatherND`` + ``ScatterND``). Prints the
median time of prefill (seq 32) and decode (seq 1) writes, per cache tensor (a layer has two).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from peft_kernel_qaic.kv_cache import write_indices, write_kv

BATCH, KV_HEADS, HEAD_DIM = 4, 4, 64


class OneHotWrite(torch.nn.Module):
    def forward(self, cache, new, position_ids):
        ctx = cache.shape[2]
        index = torch.arange(ctx).view(1, 1, ctx)
        write = (position_ids.unsqueeze(-1) == index).to(new.dtype)  # [B, S, C]
        written = (write.sum(dim=1) > 0).view(cache.shape[0], 1, ctx, 1)
        return torch.where(written, torch.matmul(write.transpose(1, 2).unsqueeze(1), new), cache)


class ScatterWrite(torch.nn.Module):
    def forward(self, cache, new, position_ids):
        batch, seq = position_ids.shape
        indices = write_indices(position_ids, torch.arange(batch), cache.shape[1], cache.shape[2])
        return write_kv(cache, indices, new, (position_ids >= 0).view(batch, 1, seq, 1))


def feeds(ctx: int, seq: int, start: int) -> dict[str, np.ndarray]:
    pos = np.tile(np.arange(start, start + seq, dtype=np.int64), (BATCH, 1))
    pos[-1, seq // 2 + 1 :] = -1 if seq > 1 else pos[-1, seq // 2 + 1 :]
    rng = np.random.default_rng(0)
    return {"cache": rng.standard_normal((BATCH, KV_HEADS, ctx, HEAD_DIM), dtype=np.float32),
            "new": rng.standard_normal((BATCH, KV_HEADS, seq, HEAD_DIM), dtype=np.float32), "position_ids": pos}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ctx", default="256,1024")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kv-write-"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    for ctx in (int(c) for c in args.ctx.split(",")):
        example = feeds(ctx, 3, 0)
        results = {}
        for name, module in (("onehot", OneHotWrite()), ("scatter", ScatterWrite())):
            path = tmp / f"{name}-{ctx}.onnx"
            torch.onnx.export(module, tuple(torch.from_numpy(example[k]) for k in ("cache", "new", "position_ids")), str(path),
                              input_names=["cache", "new", "position_ids"], output_names=["out"], opset_version=17, dynamo=False,
                              dynamic_axes={"new": {2: "seq"}, "position_ids": {1: "seq"}})
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            for phase, seq, start in (("prefill", 32, 0), ("decode", 1, 40)):
                f = feeds(ctx, seq, start)
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    out = sess.run(None, f)[0]
                    times.append(time.perf_counter() - t)
                results[name, phase] = (float(np.median(times)), out)
        for phase in ("prefill", "decode"):
            (a, out_a), (b, out_b) = results["onehot", phase], results["scatter", phase]
            assert np.array_equal(out_a, out_b), "the two writes differ"
            print(f"ctx {ctx:5d} {phase:7s} write of one [{BATCH},{KV_HEADS},{ctx},{HEAD_DIM}] cache: one-hot {1e6 * a:8.1f} us, "
                  f"ScatterND {1e6 * b:8.1f} us (x{a / b:.1f}), medians of {args.repeats}; outputs equal")


if __name__ == "__main__":
    main()
