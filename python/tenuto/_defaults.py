"""Default values for records an upstream could not (fully) provide, e.g. audio features:
`Defaults(AUDIO_FEATURE_DEFAULTS, AUDIO_FEATURE_RANGES).complete(existing, fetched)`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

from tenuto._core import Defaults

__all__ = ["AUDIO_FEATURE_DEFAULTS", "AUDIO_FEATURE_RANGES", "Defaults", "Range"]


@dataclass(frozen=True)
class Range:
    """Allowed values of a field: a number within the bounds (None: unbounded), a whole
    number when `integer`. Booleans are never numbers here."""

    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        for name in ("min", "max"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise TypeError(f"Range.{name} must be a number or None")
            if value is not None and math.isnan(value):
                raise ValueError(f"Range.{name} must not be NaN")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"Range.min ({self.min}) is above Range.max ({self.max})")


AUDIO_FEATURE_DEFAULTS = MappingProxyType(
    {
        "acousticness": 0.5,
        "danceability": 0.5,
        "energy": 0.5,
        "instrumentalness": 0.0,
        "key": 0,
        "liveness": 0.2,
        "loudness": -8.0,
        "mode": 1,
        "speechiness": 0.05,
        "tempo": 120.0,
        "valence": 0.5,
        "popularity": 50,
    }
)

_PROBABILITY = Range(0.0, 1.0)

AUDIO_FEATURE_RANGES = MappingProxyType(
    {
        "acousticness": _PROBABILITY,
        "danceability": _PROBABILITY,
        "energy": _PROBABILITY,
        "instrumentalness": _PROBABILITY,
        "liveness": _PROBABILITY,
        "speechiness": _PROBABILITY,
        "valence": _PROBABILITY,
        "key": Range(-1, 11, integer=True),
        "mode": Range(0, 1, integer=True),
        "tempo": Range(0.0, None, min_exclusive=True),
        "loudness": Range(-60.0, 5.0),
        "popularity": Range(0, 100, integer=True),
    }
)
