"""One ``forward`` or ``generate`` call of an adapted model, as plugins see it from inside.

A method whose record lists ``call_keywords`` gets a tuner that takes those keyword arguments out of
``forward`` / ``generate`` (the model never sees them; transformers' ``generate`` would refuse them)
and publishes a :class:`CallScope` for the call's duration: the method's values, the call's other
arguments (``generate``'s prompt) and a memo shared by every forward the call runs (``generate``'s
prefill and decoding steps), for per-row state that must outlive one forward.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Collection, Hashable, Iterator, Literal, Mapping

_current: contextvars.ContextVar[CallScope | None] = contextvars.ContextVar("peft_kernel_call_scope", default=None)


class CallScope:
    """A ``forward`` or ``generate`` call in progress."""

    def __init__(self, kind: Literal["forward", "generate"], args: tuple, kwargs: Mapping[str, Any],
                 values: Mapping[str, Any]):
        self.kind = kind
        self.args = args
        """The call's positional arguments (as the model receives them)."""
        self.kwargs = kwargs
        """The call's keyword arguments, without the method's own (read them, do not change them)."""
        self.values = values
        """The method's ``call_keywords`` that were given, ``{name: value}``."""
        self._memo: dict[Hashable, Any] = {}

    def argument(self, name: str, position: int = 0) -> Any:
        """The call's argument ``name``, given by keyword or at ``position`` (``None`` if absent)."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[position] if len(self.args) > position else None

    def memo(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """A value built on first use and kept for the rest of the call (every forward of a
        ``generate``). Keys are chosen by the caller; prefix them with the plugin's name."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]


def current_call() -> CallScope | None:
    """The call in progress of a model whose method declares ``call_keywords``, else ``None``."""
    return _current.get()


@contextlib.contextmanager
def call_scope(kind: Literal["forward", "generate"], args: tuple, kwargs: dict[str, Any],
               keywords: Collection[str]) -> Iterator[CallScope | None]:
    """Take ``keywords`` out of ``kwargs`` (in place) and publish the call for its duration; a no-op
    for methods without ``call_keywords``."""
    if not keywords:
        yield None
        return
    values = {k: kwargs.pop(k) for k in keywords if k in kwargs}
    token = _current.set(CallScope(kind, args, dict(kwargs), values))
    try:
        yield _current.get()
    finally:
        _current.reset(token)
