"""An export-friendly forward of a Llama-family causal LM with a static KV cache and per-row LoRA.

This module reads the weights of a transformers model (it holds references to its submodules,
never copies) and computes exactly what the transformers forward computes, in a shape the Cloud AI
100 compiler (and ONNX Runtime) can run as one static graph:

- inputs ``input_ids`` / ``position_ids`` ``[batch, seq_len]`` (``position_ids = -1`` marks
  padding), ``lora_ids`` ``[batch, 1]``, and the KV cache ``past_key.<i>`` / ``past_value.<i>``
  ``[batch, num_kv_heads, ctx_len, head_dim]``;
- outputs ``logits`` ``[batch, 1, vocab]`` (the last real token of each row) and the updated cache
  ``past_key.<i>_RetainedState`` ...: each new key/value is scattered at its position
  (``ScatterND``, QEfficient's ``CtxScatter`` pattern, see :mod:`peft_kernel_qaic.kv_cache`),
  padding never changes the cache;
- continuous batching (``continuous_batching=True``): a ``batch_index`` ``[batch, 1]`` input names
  the cache row (slot) each input row writes and reads; the cache has ``full_batch_size`` rows, so
  one prompt is prefilled into one slot (batch 1) while decode runs every slot (batch
  ``full_batch_size``);
- attention masks by position (``cache_index <= position``, and ``> position - window`` on
  sliding-window layers), so one graph serves prefill (``seq_len = prefill_seq_len``) and decode
  (``seq_len = 1``), and chunked prefill of long prompts;
- LoRA: per targeted linear, stacked ``A`` ``[slots, in, R]`` and scaled ``B`` ``[slots, R, out]``
  gathered by ``lora_ids`` and applied with two batched matmuls (``"stacked"`` mode), or a single
  adapter's ``A`` ``[in, r]`` / ``B`` ``[r, out]`` as graph inputs (``"inputs"`` mode, for
  swapping adapters without recompiling).

Architectures: Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorm) -- the families whose
decoder layer is ``input_layernorm -> self_attn(q,k,v,o) -> post_attention_layernorm ->
mlp(gate, up, down)``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from peft_kernel_qaic.adapters import decoder_layers
from peft_kernel_qaic.errors import ExportConfigError
from peft_kernel_qaic.kv_cache import write_indices, write_kv

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MASKED = -10000.0  # finite so fully-padded query rows stay finite, and fp16-safe on the device


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def check_architecture(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportConfigError(
            f"the qaic backend exports {', '.join(SUPPORTED_MODEL_TYPES)} causal LMs; got model_type "
            f"{model_type!r} ({type(model).__name__})"
        )
    decoder_layers(model)


def layer_windows(config) -> list[int | None]:
    """Sliding window (or None) of each decoder layer, as transformers applies it."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if config.model_type == "mistral":
        return [window] * n
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types]
    return [None] * n


class QaicCausalLM(nn.Module):
    """Static-shape, KV-cached, multi-LoRA forward over a transformers Llama-family model.

    ``lora_mode``: ``"stacked"`` (``lora_stacks`` buffers, ``lora_ids`` input), ``"inputs"``
    (``lora_modules`` names the modules whose ``A``/``B`` come as trailing forward arguments) or
    ``"none"``. ``continuous_batching``: a ``batch_index`` input (after ``position_ids``) picks the
    cache row of each input row.
    """

    def __init__(
        self,
        model: nn.Module,
        lora_mode: str = "stacked",
        lora_stacks: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        lora_modules: Sequence[str] = (),
        continuous_batching: bool = False,
    ) -> None:
        super().__init__()
        check_architecture(model)
        self.hf = model
        self.config = model.config
        self.lora_mode = lora_mode
        self.continuous_batching = continuous_batching
        self.layers_ = decoder_layers(model)
        self.windows = layer_windows(model.config)
        self.stack_index: dict[str, int] = {}
        self.stack_a = nn.ParameterList()
        self.stack_b = nn.ParameterList()
        if lora_mode == "stacked":
            for i, (module, (a, b)) in enumerate(sorted((lora_stacks or {}).items())):
                self.stack_index[module] = i
                self.stack_a.append(nn.Parameter(a, requires_grad=False))
                self.stack_b.append(nn.Parameter(b, requires_grad=False))
        self.input_modules = list(lora_modules) if lora_mode == "inputs" else []
        attn = self.layers_[0].self_attn
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)

    @property
    def num_layers(self) -> int:
        return len(self.layers_)

    def kv_shape(self, batch_size: int, ctx_len: int) -> tuple[int, int, int, int]:
        return (batch_size, self.num_kv_heads, ctx_len, self.head_dim)

    # ---- LoRA ---------------------------------------------------------------------------
    def _linear(self, module: nn.Module, name: str, x: torch.Tensor, lora_ids, lora_inputs) -> torch.Tensor:
        y = _base(module)(x)
        if self.lora_mode == "stacked" and name in self.stack_index:
            i = self.stack_index[name]
            a = self.stack_a[i][lora_ids]  # [B, in, R]
            b = self.stack_b[i][lora_ids]  # [B, R, out]
            y = y + torch.bmm(torch.bmm(x, a), b)
        elif self.lora_mode == "inputs" and name in lora_inputs:
            a, b = lora_inputs[name]
            y = y + torch.matmul(torch.matmul(x, a), b)
        return y

    # ---- forward -----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *args: torch.Tensor):
        n = self.num_layers
        batch, seq = input_ids.shape
        if self.continuous_batching:
            rows, args = args[0].reshape(-1), args[1:]
        else:
            rows = torch.arange(batch, device=input_ids.device)
        if self.lora_mode == "stacked":
            lora_ids, args = args[0], args[1:]
            ids = lora_ids.reshape(-1)
        else:
            ids = None
        past = args[: 2 * n]
        lora_inputs = {}
        if self.lora_mode == "inputs":
            flat = args[2 * n :]
            lora_inputs = {m: (flat[2 * j], flat[2 * j + 1]) for j, m in enumerate(self.input_modules)}

        hf_inner = self.hf.model
        h = hf_inner.embed_tokens(input_ids)
        cos, sin = hf_inner.rotary_emb(h, position_ids.clamp(min=0))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, D]

        ctx_len = past[0].shape[2]
        cache_index = torch.arange(ctx_len, device=input_ids.device).view(1, 1, ctx_len)
        pos = position_ids.unsqueeze(-1)  # [B, S, 1]
        kv_index = write_indices(position_ids, rows, self.num_kv_heads, ctx_len)  # [B, KV, S, 3]
        valid = (position_ids >= 0).view(batch, 1, seq, 1)
        causal = cache_index <= pos  # [B, S, C]
        masks = {}
        for w in set(self.windows):
            allowed = causal if w is None else causal & (cache_index > pos - w)
            masks[w] = allowed.unsqueeze(1)  # [B, 1, S, C]

        groups = self.num_heads // self.num_kv_heads
        new_past = []
        for i, layer in enumerate(self.layers_):
            prefix = f"model.layers.{i}."
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = self._linear(attn.q_proj, prefix + "self_attn.q_proj", x, ids, lora_inputs)
            k = self._linear(attn.k_proj, prefix + "self_attn.k_proj", x, ids, lora_inputs)
            v = self._linear(attn.v_proj, prefix + "self_attn.v_proj", x, ids, lora_inputs)
            q = q.view(batch, seq, self.num_heads, self.head_dim)
            k = k.view(batch, seq, self.num_kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q.transpose(1, 2)
            k = k.transpose(1, 2)
            v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin

            past_k, past_v = past[2 * i], past[2 * i + 1]
            k_cache = write_kv(past_k, kv_index, k, valid)  # [rows, KV, C, D]
            v_cache = write_kv(past_v, kv_index, v, valid)
            new_past += [k_cache, v_cache]
            if self.continuous_batching:
                k_cache, v_cache = k_cache[rows], v_cache[rows]  # [B, KV, C, D]

            k_all = k_cache.unsqueeze(2).expand(batch, self.num_kv_heads, groups, ctx_len, self.head_dim)
            v_all = v_cache.unsqueeze(2).expand(batch, self.num_kv_heads, groups, ctx_len, self.head_dim)
            k_all = k_all.reshape(batch, self.num_heads, ctx_len, self.head_dim)
            v_all = v_all.reshape(batch, self.num_heads, ctx_len, self.head_dim)
            scores = torch.matmul(q, k_all.transpose(2, 3)) * self.scaling
            scores = torch.where(masks[self.windows[i]], scores, torch.tensor(MASKED, dtype=scores.dtype))
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out = torch.matmul(probs, v_all).transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
            h = h + self._linear(attn.o_proj, prefix + "self_attn.o_proj", out, ids, lora_inputs)

            mlp = layer.mlp
            x = layer.post_attention_layernorm(h)
            gate = self._linear(mlp.gate_proj, prefix + "mlp.gate_proj", x, ids, lora_inputs)
            up = self._linear(mlp.up_proj, prefix + "mlp.up_proj", x, ids, lora_inputs)
            h = h + self._linear(mlp.down_proj, prefix + "mlp.down_proj", mlp.act_fn(gate) * up, ids, lora_inputs)

        last = position_ids.argmax(dim=1, keepdim=True)  # [B, 1]
        h_last = torch.gather(h, 1, last.unsqueeze(-1).expand(batch, 1, h.shape[-1]))
        logits = self.hf.lm_head(hf_inner.norm(h_last))
        return (logits.float(), *new_past)

    # ---- names the ONNX graph uses ----------------------------------------------------------
    def input_names(self) -> list[str]:
        names = ["input_ids", "position_ids"]
        if self.continuous_batching:
            names.append("batch_index")
        if self.lora_mode == "stacked":
            names.append("lora_ids")
        for i in range(self.num_layers):
            names += [f"past_key.{i}", f"past_value.{i}"]
        for m in self.input_modules:
            names += [f"{m}.lora_A", f"{m}.lora_B"]
        return names

    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in range(self.num_layers):
            names += [f"past_key.{i}_RetainedState", f"past_value.{i}_RetainedState"]
        return names

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {
            "input_ids": {0: "batch_size", 1: "seq_len"},
            "position_ids": {0: "batch_size", 1: "seq_len"},
            "logits": {0: "batch_size"},
        }
        if self.lora_mode == "stacked":
            axes["lora_ids"] = {0: "batch_size"}
        cache_rows = "batch_size"
        if self.continuous_batching:
            axes["batch_index"] = {0: "batch_size"}
            cache_rows = "full_batch_size"
        for i in range(self.num_layers):
            for kind in ("key", "value"):
                axes[f"past_{kind}.{i}"] = {0: cache_rows, 2: "ctx_len"}
                axes[f"past_{kind}.{i}_RetainedState"] = {0: cache_rows, 2: "ctx_len"}
        return axes
