"""Per-request cache state, for X-Cache headers: every cached call made inside a
`request_scope()` records its state, and `current_state()` combines them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tenuto._core import RequestState, _request_var, current_state

__all__ = ["RequestState", "current_state", "request_scope"]


@contextlib.contextmanager
def request_scope() -> Iterator[RequestState]:
    """Starts a fresh request state for the code inside (the web integrations do this for
    every request). Tasks and threads started with this context copy share it."""
    var = _request_var()
    token = var.set(RequestState())
    try:
        yield var.get()
    finally:
        var.reset(token)
