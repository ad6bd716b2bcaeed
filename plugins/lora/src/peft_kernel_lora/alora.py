"""Activated LoRA (aLoRA, ``LoraConfig.alora_invocation_tokens``): the adapter's delta applies to a
row's tokens from the start of the last occurrence of the invocation sequence onward; the tokens
before it see the base model, so their KV cache is the base model's.

Per-row starts are found once per forward of the model, not per layer: a forward pre-hook on the
adapted model (installed by :func:`install`, removed by :func:`uninstall` when the last aLoRA
adapter leaves) publishes a view of the call for every aLoRA layer, which asks it for the starts of
its invocation sequence (memoised per sequence) and masks its delta with ``position >= start[row]``
(gradient checkpointing, which runs layers again during the backward, reuses the last forward's view).

In ``generate`` the starts come from the prompt, once for the whole call (:class:`Prompt`, kept in the
core's call scope): the last occurrence in each prompt row, or HF's ``alora_offsets=[...]`` (per row,
how many trailing prompt tokens are adapted; ``None``: none). The generated tokens are adapted from
there on, and an invocation sequence that the model generates starts nothing, as in HF PEFT. A prompt
whose prefix is already in ``past_key_values`` (prefilled by the base model, adapter disabled: HF's
documented cache reuse) is searched whole, cached part included.

A forward outside ``generate`` searches its own ``input_ids``; a row whose chunk does not hold the
sequence keeps the start found by the forward that built its cache (a hand-written decoding loop); a
row without it anywhere gets no adapter, as in HF PEFT. ``alora_offsets`` overrides the search.
"""

from __future__ import annotations

import contextvars
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from peft_kernel.plugin_api import CallScope, ConfigError, UnsupportedFeatureError, current_call

_current: contextvars.ContextVar[Invocations | PromptView | None] = contextvars.ContextVar("peft_kernel_lora_alora", default=None)
_finished: Invocations | PromptView | None = None
"""The last forward's view, for layers that gradient checkpointing recomputes during the backward."""
_NEVER = torch.iinfo(torch.long).max // 2
"""The start of a row without the invocation sequence: past any position."""
_PROMPT = "peft_kernel_lora.alora.prompt"
"""The key of a ``generate`` call's :class:`Prompt` in the core's call scope."""
_STATE = "_peft_kernel_alora_state"
_STACK = "_peft_kernel_alora_tokens"


def last_starts(input_ids: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """Per row of ``input_ids`` [batch, seq], the position where the last occurrence of ``tokens``
    begins, or ``-1`` where the row does not hold it (vectorised over rows and positions)."""
    n, seq = len(tokens), input_ids.shape[1]
    batch = input_ids.shape[0]
    if seq < n:
        return torch.full((batch,), -1, dtype=torch.long, device=input_ids.device)
    windows = input_ids.unfold(1, n, 1)  # [batch, seq - n + 1, n]
    wanted = torch.tensor(list(tokens), dtype=input_ids.dtype, device=input_ids.device)
    hit = (windows == wanted).all(-1)
    positions = torch.arange(hit.shape[1], device=input_ids.device).expand_as(hit)
    return torch.where(hit, positions, -1).amax(-1)


class Invocations:
    """One forward's view: per invocation sequence, the row starts relative to this chunk."""

    def __init__(self, input_ids: torch.Tensor | None, embeds: torch.Tensor | None, past: int, offsets: Any,
                 state: dict[Any, torch.Tensor]):
        self.input_ids = input_ids
        self.embeds = embeds  # for the shape only, with explicit offsets
        self.past = past
        self.offsets = offsets
        self.state = state  # per sequence: the absolute starts of the rows in the cache, kept between forwards
        self._chunk: dict[tuple[int, ...], torch.Tensor] = {}

    def starts(self, tokens: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
        """``[batch]`` start of each row relative to this chunk, or None when this forward has no
        ``input_ids`` (the adapter is then off, as HF PEFT does with a warning)."""
        if tokens not in self._chunk:
            absolute = self._absolute(tokens)
            if absolute is None:
                return None
            self._chunk[tokens] = absolute - self.past
        return self._chunk[tokens].to(device)

    def _absolute(self, tokens: tuple[int, ...]) -> torch.Tensor | None:
        ids = self.input_ids
        if self.offsets is not None and (ids is not None or self.embeds is not None):
            batch, seq = (ids if ids is not None else self.embeds).shape[:2]
            found = _explicit(self.offsets, batch, self.past + seq)
            self.state[tokens] = found
            return found
        if ids is None:
            warnings.warn("Cannot calculate aLoRA offsets when only inputs_embeds are provided. Disabling aLoRA for "
                          "this forward pass.", UserWarning, stacklevel=4)
            return None
        found = last_starts(ids, tokens)
        found = torch.where(found >= 0, found + self.past, _NEVER)
        kept = self.state.get(tokens) if self.past else None
        if kept is not None and kept.shape == found.shape:
            found = torch.where(found == _NEVER, kept.to(found.device), found)
        self.state[tokens] = found
        return found


class Prompt:
    """A ``generate`` call's prompt: per invocation sequence, each prompt row's absolute start (found
    once, used by the prefill and every decoding step)."""

    def __init__(self, scope: CallScope):
        ids = scope.argument("input_ids")
        ids = scope.kwargs.get("inputs") if ids is None else ids  # generate's other name for the prompt
        self.ids = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point() else None
        embeds = scope.kwargs.get("inputs_embeds")
        shaped = self.ids if self.ids is not None else embeds
        self.shape = None if shaped is None else tuple(shaped.shape[:2])
        self.offsets = scope.values.get("alora_offsets")
        self._absolute: dict[tuple[int, ...], torch.Tensor | None] = {}

    def view(self, batch: int, past: int) -> PromptView:
        return PromptView(self, batch, past)

    def absolute(self, tokens: tuple[int, ...]) -> torch.Tensor | None:
        """``[prompt rows]`` absolute starts, or None when neither ``input_ids`` nor offsets are given."""
        if tokens not in self._absolute:
            self._absolute[tokens] = self._find(tokens)
        return self._absolute[tokens]

    def _find(self, tokens: tuple[int, ...]) -> torch.Tensor | None:
        if self.offsets is not None and self.shape is not None:
            return _explicit(self.offsets, *self.shape)
        if self.ids is None:
            warnings.warn("Cannot calculate aLoRA offsets when only inputs_embeds are provided. Disabling aLoRA for "
                          "this generate call.", UserWarning, stacklevel=5)
            return None
        found = last_starts(self.ids, tokens)
        return torch.where(found >= 0, found, _NEVER)


class PromptView:
    """One forward of a ``generate`` call: the prompt's starts for this forward's rows (beams and
    returned sequences repeat each prompt row) relative to its chunk."""

    def __init__(self, prompt: Prompt, batch: int, past: int):
        self.prompt, self.batch, self.past = prompt, batch, past

    def starts(self, tokens: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
        absolute = self.prompt.absolute(tokens)
        if absolute is None:
            return None
        if self.batch % absolute.shape[0]:
            raise ValueError(f"aLoRA found starts for {absolute.shape[0]} prompt rows but generate ran a batch of "
                             f"{self.batch} rows")
        return (absolute.repeat_interleave(self.batch // absolute.shape[0]) - self.past).to(device)


def _explicit(offsets: Any, batch: int, length: int) -> torch.Tensor:
    """HF's ``alora_offsets``: per row, the number of trailing tokens adapted (None: none)."""
    values = list(offsets.tolist() if isinstance(offsets, torch.Tensor) else offsets)
    if len(values) != batch:
        raise ValueError(f"alora_offsets has {len(values)} entries but the batch has {batch} rows")
    return torch.tensor([_NEVER if v is None else length - int(v) for v in values], dtype=torch.long)


def _cache_length(kwargs: dict[str, Any]) -> int:
    for key in ("past_key_values", "cache"):
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


def _before(module: nn.Module, args: tuple, kwargs: dict) -> None:
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if ids is not None and (ids.dim() != 2 or ids.is_floating_point()):
        ids = None
    embeds = kwargs.get("inputs_embeds")
    past = _cache_length(kwargs)
    scope = current_call()
    view: Invocations | PromptView
    if scope is not None and scope.kind == "generate":
        shaped = ids if ids is not None else embeds
        batch = shaped.shape[0] if shaped is not None else 0
        view = scope.memo(_PROMPT, lambda: Prompt(scope)).view(batch, past)
    else:
        offsets = scope.values.get("alora_offsets") if scope is not None else None
        state = module.__dict__.setdefault(_STATE, {})  # a deep copy of the model gets its own
        view = Invocations(ids, embeds, past, offsets, state)
    module.__dict__.setdefault(_STACK, []).append(_current.set(view))


def _after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    global _finished
    stack = module.__dict__.get(_STACK)
    if stack:
        _finished = _current.get()
        _current.reset(stack.pop())


def _in_backward() -> bool:
    """Whether autograd is running a backward pass (where gradient checkpointing recomputes layers)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def install(model: nn.Module) -> None:
    """Publish the starts around every forward of ``model`` (once per model)."""
    if _before in model._forward_pre_hooks.values():
        return
    model.register_forward_pre_hook(_before, with_kwargs=True, prepend=True)
    model.register_forward_hook(_after, with_kwargs=True, always_call=True)


def uninstall(model: nn.Module) -> None:
    """Remove :func:`install`'s hooks and the decoding state from ``model``."""
    for hooks, hook in ((model._forward_pre_hooks, _before), (model._forward_hooks, _after)):
        for key in [k for k, h in hooks.items() if h is hook]:
            del hooks[key]
            model._forward_hooks_with_kwargs.pop(key, None)
            model._forward_hooks_always_called.pop(key, None)
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    model.__dict__.pop(_STATE, None)
    model.__dict__.pop(_STACK, None)


def check_layer(layer: nn.Module, config: Any, module_name: str, supported: bool) -> tuple[int, ...] | None:
    """The layer's invocation sequence for an adapter of ``config`` (None for plain LoRA); refuses
    layer types HF PEFT refuses with aLoRA (all but Linear / Conv1D)."""
    tokens = config.alora_invocation_tokens
    if not tokens:
        return None
    if not supported:
        raise ConfigError(
            f"LoraConfig.alora_invocation_tokens (aLoRA) supports Linear / Conv1D layers only; module {module_name!r} "
            f"is a {type(layer.base_layer).__name__}. Leave it out of target_modules."
        )
    return tuple(int(t) for t in tokens)


def hotswap(layer: Any, adapter_name: str, config: Any, module_name: str, supported: bool) -> None:
    """Hotswapping takes the new adapter's invocation sequence (HF PEFT keeps the old one, so the
    swapped adapter computes as neither); a plain LoRA adapter cannot become an aLoRA one there, as
    the model was never set up to find invocations."""
    invocation = check_layer(layer, config, module_name, supported)
    held = layer.alora_invocation_tokens
    if invocation is None:
        held.pop(adapter_name, None)
    elif adapter_name in held:
        held[adapter_name] = invocation
    else:
        raise UnsupportedFeatureError(
            f"cannot hotswap the plain LoRA adapter {adapter_name!r} for an aLoRA one (alora_invocation_tokens="
            f"{list(invocation)}); load it with load_adapter() instead."
        )


def refuse_merge(adapter_name: str) -> None:
    raise UnsupportedFeatureError(
        f"aLoRA does not support merging: adapter {adapter_name!r} (alora_invocation_tokens) applies to the tokens "
        "from its invocation sequence on only, which no merged weight can express."
    )


def mask(delta: torch.Tensor, tokens: tuple[int, ...], rows: torch.Tensor | None = None) -> torch.Tensor:
    """``delta`` [batch, seq, ...] kept from each row's start on (``rows``: the batch rows ``delta``
    holds, for a mixed batch); zero where no start is known."""
    context = _current.get()
    if context is None and _in_backward():
        context = _finished
    if context is None:
        warnings.warn("An aLoRA layer ran outside a forward of the model it was added to, so no invocation offsets "
                      "are known: the adapter is off for this call.", UserWarning, stacklevel=3)
        return torch.zeros_like(delta)
    starts = context.starts(tokens, delta.device)
    if starts is None:
        return torch.zeros_like(delta)
    if rows is not None:
        starts = starts.index_select(0, rows)
    if delta.dim() < 2 or delta.shape[0] != starts.shape[0]:
        raise ValueError(f"aLoRA expects inputs [batch, seq, ...] with {starts.shape[0]} rows; the layer got "
                         f"{tuple(delta.shape)}")
    keep = torch.arange(delta.shape[1], device=delta.device)[None, :] >= starts[:, None]
    return delta * keep.view(*keep.shape, *([1] * (delta.dim() - 2))).to(delta.dtype)


def mixed_forward(layer: Any, x: torch.Tensor, routing: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A mixed batch where some routed adapter is aLoRA: each adapter's rows get its delta, masked
    with those rows' starts (one masked product per adapter, no loop over rows)."""
    result = layer.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    for name, rows in routing.groups(x.shape[0], x.device).items():
        if not layer.has_adapter(name):
            continue
        delta = layer.delta(x.index_select(0, rows), name, rows=rows)
        result = result.index_add(0, rows, delta.to(result.dtype))
    return result.to(dtype)
