"""tenuto: hold the note. An envelope cache (fresh / stale / miss) on memory or
Redis/Valkey with fail-open fallback, implemented in Rust.

The public names live here; ``tenuto._core`` is the native module behind them.
"""

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

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "Cache",
    "Envelope",
    "Lookup",
    "TenutoError",
    "__version__",
    "stable_key",
]
