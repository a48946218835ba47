"""Inbound (per-client) limits shared by the Flask and FastAPI integrations: who the
client is, and the RateLimit-* / Retry-After headers of a decision."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping

from tenuto._core import Cache
from tenuto._limits import RateLimiter


def client_address(peer: str | None, headers: Mapping[str, str], trust_proxy: int) -> str:
    """The peer address; with `trust_proxy=N`, the address N proxies back in
    X-Forwarded-For (the first N hops are trusted to append honestly). Never trust a
    header the client could have written itself: the default is 0."""
    if trust_proxy > 0:
        forwarded = [
            hop.strip() for hop in headers.get("x-forwarded-for", "").split(",") if hop.strip()
        ]
        if len(forwarded) >= trust_proxy:
            return forwarded[-trust_proxy]
    return peer or "unknown"


def check_trust_proxy(trust_proxy: int) -> None:
    """Only a whole number of proxies the app runs behind, never negative."""
    if isinstance(trust_proxy, bool) or not isinstance(trust_proxy, int) or trust_proxy < 0:
        raise ValueError(f"trust_proxy must be a whole number of proxies >= 0, got {trust_proxy!r}")


class InboundLimit:
    """One inbound limit: N per period per client, N back to back, for the whole app: shared
    through Redis by every worker and host using the same `name` when the app's tenuto
    integration has a Redis-backed cache (or `url` names a Redis); `url="memory://"` keeps
    it per process. The limiter is made at the first request, when the app is known."""

    def __init__(self, rate: str, trust_proxy: int, name: str, url: str | None = None) -> None:
        check_trust_proxy(trust_proxy)
        RateLimiter(rate, mode="inbound")  # a bad rate fails here, at decoration
        self.rate = rate
        self.trust_proxy = trust_proxy
        self.name = name
        self.url = url
        self._limiter: RateLimiter | None = None
        self._lock = threading.Lock()

    def limiter_for(self, app_cache: Cache | None) -> RateLimiter:
        """The limiter, made on first use: on `url`, else the Redis of the app's cache."""
        if self._limiter is None:
            with self._lock:
                if self._limiter is None:
                    url = self.url
                    if url is None and app_cache is not None:
                        url = app_cache._connection_url
                    if url in ("memory://", "memory"):
                        url = None
                    self._limiter = RateLimiter(self.rate, url=url, name=self.name, mode="inbound")
        return self._limiter

    @property
    def limiter(self) -> RateLimiter:
        return self.limiter_for(None)

    def decide(
        self, client: str, app_cache: Cache | None = None
    ) -> tuple[bool, dict[str, str], str]:
        """`(admitted, headers, refusal message)` for one request of `client`."""
        limiter = self.limiter_for(app_cache)
        ok, retry_after, limit, remaining, reset = limiter.decide(client)
        headers = {
            "RateLimit-Limit": str(limit),
            "RateLimit-Remaining": str(remaining),
            "RateLimit-Reset": str(math.ceil(reset)),
        }
        message = ""
        if not ok:
            wait = max(1, math.ceil(retry_after))
            headers["Retry-After"] = str(wait)
            message = f"rate limit exceeded ({self.rate}); retry in {wait} s"
        return ok, headers, message
