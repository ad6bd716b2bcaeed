"""X-LoRA's first pass: the model run with every expert at ``scaling_pass_value``, for the hidden
states the classifier reads.

With a key/value cache (``generate``, or a hand-written decoding loop that passes ``cache``,
``past_key_values`` before transformers 5.2x, back) the scaling pass keeps a cache of its own: its keys and values are those
of the scaling pass, not of the real pass. Each cache of the real pass is paired with one of the
scaling pass (weakly: both go when the caller drops the real one); a fresh, empty cache gets an
empty copy. What ``generate`` does to the real cache between steps (beam search reorders it, assisted
decoding crops it) is done to the paired one too.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import nn

from peft_kernel.plugin_api import AdapterMix, UnsupportedFeatureError, adapter_mix

CACHE_KEYS = ("cache", "past_key_values")
MIRRORED = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave", "crop")
"""The in-place ``Cache`` methods ``generate`` calls between steps, repeated on the paired cache."""
"""The keyword (and output attribute) of transformers' key/value cache: new name first."""


def cache_of(mapping: Any) -> tuple[str | None, Any]:
    """``(keyword, cache)`` of a forward's keywords (a dict) or output (an object); ``(None, None)``."""
    for key in CACHE_KEYS:
        cache = mapping.get(key) if isinstance(mapping, dict) else getattr(mapping, key, None)
        if cache is not None:
            return key, cache
    return None, None


class ScalingPass:
    """Runs scaling passes for one X-LoRA model and keeps their caches paired with the real ones."""

    def __init__(self) -> None:
        self._caches: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def hidden_states(self, model: nn.Module, args: tuple, kwargs: dict, mix: AdapterMix) -> tuple[torch.Tensor, Any]:
        """The last hidden state ``[batch, seq, hidden]`` of ``model(*args, **kwargs)`` under ``mix``,
        without gradients, and the scaling pass's cache (``None`` without one)."""
        kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
        key, cache = cache_of(kwargs)
        if key is not None:
            kwargs[key] = self._own_cache(cache)
        kwargs.update(output_hidden_states=True, return_dict=True)
        with torch.no_grad(), adapter_mix(mix):
            output = model(*args, **kwargs)
        hidden = getattr(output, "hidden_states", None)
        if not hidden:
            raise UnsupportedFeatureError(f"X-LoRA reads the hidden states of the scaling pass, and "
                                          f"{type(model).__name__} returned none: use a transformers model")
        return hidden[-1], cache_of(output)[1]

    def pair(self, cache: Any, own: Any) -> None:
        """Remember that the real pass's new ``cache`` goes with the scaling pass's ``own``."""
        if cache is not None and own is not None and cache is not own and cache not in self._caches:
            self._caches[cache] = own
            _mirror(cache, own)

    def _own_cache(self, cache: Any) -> Any:
        try:
            own = self._caches.get(cache)
        except TypeError:  # not weak-referenceable: a legacy tuple cache
            raise UnsupportedFeatureError("X-LoRA needs its key/value cache as a transformers Cache object") from None
        if own is not None:
            return own
        if cache.get_seq_length() != 0:
            raise UnsupportedFeatureError(
                "the key/value cache holds tokens this X-LoRA model did not produce: its scaling pass keeps a cache "
                "of its own, paired with the caches it returns; start from an empty cache or none")
        own = self._caches[cache] = copy.deepcopy(cache)
        _mirror(cache, own)
        return own


def _mirror(cache: Any, own: Any) -> None:
    """Make ``cache``'s in-place reordering methods (:data:`MIRRORED`) apply to ``own`` too."""
    for name in MIRRORED:
        method = getattr(cache, name, None)
        if callable(method):
            setattr(cache, name, _both(method, getattr(own, name)))


def _both(method: Any, twin: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        twin(*args, **kwargs)
        return method(*args, **kwargs)

    return call
