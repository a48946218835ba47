"""The limiters, breakers, registries and cached functions alive in this process, so an
exporter can read their counters at scrape time (caches are tracked natively). Weak
references: nothing here keeps an object alive, and nothing runs on a hot path."""

from __future__ import annotations

import weakref
from typing import Any

limiters: weakref.WeakSet[Any] = weakref.WeakSet()
breakers: weakref.WeakSet[Any] = weakref.WeakSet()
registries: weakref.WeakSet[Any] = weakref.WeakSet()
functions: weakref.WeakSet[Any] = weakref.WeakSet()
