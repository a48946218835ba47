"""`tenuto.Defaults`: merge order, null handling, ranges, counters, inputs untouched."""

from __future__ import annotations

import copy

import pytest

import tenuto

AUDIO = tenuto.Defaults(tenuto.AUDIO_FEATURE_DEFAULTS, tenuto.AUDIO_FEATURE_RANGES)


def test_the_shipped_defaults() -> None:
    assert dict(tenuto.AUDIO_FEATURE_DEFAULTS) == {
        "acousticness": 0.5, "danceability": 0.5, "energy": 0.5, "instrumentalness": 0.0,
        "key": 0, "liveness": 0.2, "loudness": -8.0, "mode": 1, "speechiness": 0.05,
        "tempo": 120.0, "valence": 0.5, "popularity": 50,
    }  # fmt: skip
    with pytest.raises(TypeError):
        tenuto.AUDIO_FEATURE_DEFAULTS["tempo"] = 1  # type: ignore[index]


def test_existing_then_fetched_then_defaults() -> None:
    defaults = tenuto.Defaults({"a": 1, "b": 2, "c": 3, "d": 4})
    existing = {"a": 10, "b": None, "extra": "kept"}
    fetched = {"a": 100, "b": 20, "c": None, "other": None}
    before = copy.deepcopy((existing, fetched))
    out = defaults.complete(existing, fetched)
    assert out == {"a": 10, "b": 20, "c": 3, "d": 4, "extra": "kept", "other": None}
    assert (existing, fetched) == before, "inputs are never mutated"
    assert defaults.complete() == {"a": 1, "b": 2, "c": 3, "d": 4}
    assert defaults.complete(None, {"d": 40}) == {"a": 1, "b": 2, "c": 3, "d": 40}


def test_ranges_replace_invalid_values() -> None:
    out = AUDIO.complete(
        {"energy": 1.5, "key": 3, "tempo": 0.0},
        {"energy": 0.9, "key": 5, "mode": True, "popularity": 50.0, "loudness": -61},
    )
    assert out["energy"] == 0.9, "out-of-range existing value falls back to fetched"
    assert out["key"] == 3
    assert out["tempo"] == 120.0, "tempo must be above 0"
    assert out["mode"] == 1, "bool is not a number here"
    assert out["popularity"] == 50, "a float is the wrong type for an integer field"
    assert out["loudness"] == -8.0
    stats = AUDIO.stats()
    assert stats["invalid_replaced"]["energy"] >= 1 and stats["invalid_replaced"]["tempo"] >= 1


def test_counters_and_summary() -> None:
    defaults = tenuto.Defaults({"a": 0, "b": 0})
    batch = {f"t{i}": {"a": 1, "b": 1} for i in range(41)}
    batch.update({f"u{i}": {"a": 1} for i in range(9)})
    out = defaults.complete_many({}, batch)
    assert len(out) == 50 and out["u0"] == {"a": 1, "b": 0}
    assert defaults.summary() == "features for 41/50 tracks, 9 using defaults"
    stats = defaults.stats()
    assert stats["records"] == 50 and stats["with_defaults"] == 9
    assert stats["defaults_applied"] == {"a": 0, "b": 9}
    defaults.reset()
    assert defaults.stats()["records"] == 0


def test_complete_many_merges_by_id_in_order() -> None:
    defaults = tenuto.Defaults({"x": 0})
    out = defaults.complete_many({"b": {"x": 2}, "a": {"x": None}}, {"a": {"x": 1}, "c": {}})
    assert list(out) == ["b", "a", "c"]
    assert out == {"b": {"x": 2}, "a": {"x": 1}, "c": {"x": 0}}


def test_matches_a_plain_python_rule_on_many_records() -> None:
    def reference(existing, fetched):
        out = {}
        for source in (existing, fetched):
            for k, v in source.items():
                if k not in out and v is not None:
                    out[k] = v
        for k, v in tenuto.AUDIO_FEATURE_DEFAULTS.items():
            if out.get(k) is None:
                out[k] = v
        return out

    existing = {f"t{i}": {"tempo": 100.0 + i} if i % 3 else {} for i in range(500)}
    fetched = {f"t{i}": {"energy": (i % 10) / 10, "key": i % 12, "tempo": None} for i in range(500)}
    out = tenuto.Defaults(tenuto.AUDIO_FEATURE_DEFAULTS).complete_many(existing, fetched)
    assert out == {i: reference(existing[i], fetched[i]) for i in existing}


class TestBadInput:
    def test_bad_arguments(self) -> None:
        with pytest.raises(TypeError):
            tenuto.Defaults([1, 2])
        with pytest.raises(ValueError, match="no default"):
            tenuto.Defaults({"a": 1}, {"b": (0, 1)})
        with pytest.raises(TypeError):
            AUDIO.complete([("tempo", 1)])
        with pytest.raises(ValueError):
            tenuto.Range(2, 1)
        with pytest.raises(TypeError):
            tenuto.Range("0", 1)

    def test_tuple_ranges_are_inclusive(self) -> None:
        d = tenuto.Defaults({"p": 0.5}, {"p": (0, 1)})
        assert d.complete({"p": 1}) == {"p": 1}
        assert d.complete({"p": 1.01}) == {"p": 0.5}


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("x", TypeError, 'range of "tempo" must be a \\(min, max\\) pair or a tenuto.Range'),
        (5, TypeError, 'range of "tempo"'),
        ((2, 1), ValueError, 'range of "tempo" is invalid: min \\(2\\) is above max \\(1\\)'),
        ((float("nan"), 1), ValueError, "NaN"),
        ((True, 1), TypeError, "not bool"),
        (("a", 1), TypeError, "must be numbers"),
    ],
)
def test_bad_ranges_are_refused_up_front(spec, error, message) -> None:
    with pytest.raises(error, match=message):
        tenuto.Defaults({"tempo": 120.0}, {"tempo": spec})
