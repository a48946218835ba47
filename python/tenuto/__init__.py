"""tenuto: hold the note. An envelope cache (fresh / stale / miss) on memory or
Redis/Valkey with fail-open fallback, single-flight and cached-function decorators,
implemented in Rust.

The public names live here; ``tenuto._core`` is the native module behind them.
"""

from tenuto._cached import Backoff
from tenuto._core import (
    BackendError,
    BackendUnavailable,
    Cache,
    Envelope,
    Lookup,
    TenutoError,
    __version__,
    stable_key,
)
from tenuto._request import RequestState, current_state, request_scope
from tenuto._singleflight import SingleFlight

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "Backoff",
    "Cache",
    "Envelope",
    "Lookup",
    "RequestState",
    "SingleFlight",
    "TenutoError",
    "__version__",
    "current_state",
    "request_scope",
    "stable_key",
]
