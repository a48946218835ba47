"""tenuto: hold the note. An envelope cache (fresh / stale / miss) on memory or
Redis/Valkey with fail-open fallback, single-flight and cached-function decorators, an ID
registry and default-value fallback, implemented in Rust.

The public names live here; ``tenuto._core`` is the native module behind them.
"""

from tenuto._cached import Backoff
from tenuto._client import Client
from tenuto._core import (
    BackendError,
    BackendUnavailable,
    Cache,
    Envelope,
    InvalidJSON,
    Lookup,
    Response,
    TenutoError,
    UpstreamError,
    UpstreamTimeout,
    __version__,
    stable_key,
)
from tenuto._defaults import AUDIO_FEATURE_DEFAULTS, AUDIO_FEATURE_RANGES, Defaults, Range
from tenuto._limits import CircuitBreaker, CircuitOpen, RateLimited, RateLimiter
from tenuto._prewarm import CancelToken, Prewarmer
from tenuto._registry import IdRegistry, ResolveError
from tenuto._request import RequestState, current_state, request_scope
from tenuto._singleflight import SingleFlight

__all__ = [
    "AUDIO_FEATURE_DEFAULTS",
    "AUDIO_FEATURE_RANGES",
    "BackendError",
    "BackendUnavailable",
    "Backoff",
    "Cache",
    "CancelToken",
    "CircuitBreaker",
    "CircuitOpen",
    "Client",
    "Defaults",
    "Envelope",
    "IdRegistry",
    "InvalidJSON",
    "Lookup",
    "Prewarmer",
    "Range",
    "RateLimited",
    "RateLimiter",
    "RequestState",
    "ResolveError",
    "Response",
    "SingleFlight",
    "TenutoError",
    "UpstreamError",
    "UpstreamTimeout",
    "__version__",
    "current_state",
    "request_scope",
    "stable_key",
]
