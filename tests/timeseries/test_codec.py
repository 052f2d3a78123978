"""Series-chunk codecs and chunk rows: bit-exact round trips (issue 19)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from twin.timeseries import codec
from twin.timeseries.base import RAW_SCHEMA, TS_TYPE
from twin.timeseries.chunks import build_chunks, chunk_partials, decode_chunks, trim_chunks
from twin.timeseries.partials import combine, raw_partials

_SPECIAL = [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, float("inf"), float("-inf")]


def _nan_with_payload(payload: int, negative: bool) -> float:
    bits = (
        0x7FF0_0000_0000_0000 | (payload & 0x000F_FFFF_FFFF_FFFF) | (1 << 51 if not payload else 0)
    )
    if negative:
        bits |= 1 << 63
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


float_bits = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
    st.sampled_from(_SPECIAL),
    st.builds(_nan_with_payload, st.integers(0, 2**52 - 1), st.booleans()),
    st.integers(-(10**6), 10**6).map(lambda i: i / 100),
)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).view(np.uint64)


@settings(max_examples=300, deadline=None)
@given(st.lists(float_bits, max_size=300))
def test_values_round_trip_bit_exact(values: list[float]) -> None:
    v = np.array(values, dtype=np.float64)
    out = codec.decode_values(codec.encode_values(v))
    assert np.array_equal(_bits(out), _bits(v))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**62), 2**62), max_size=300))
def test_timestamps_round_trip_any_order_and_duplicates(ts: list[int]) -> None:
    t = np.array(ts, dtype=np.int64)
    assert np.array_equal(codec.decode_ts(codec.encode_ts(t)), t)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**53) + 1, 2**53 - 1), min_size=1, max_size=300))
def test_integers_round_trip(ints: list[int]) -> None:
    v = np.array(ints, dtype=np.float64)
    assert np.array_equal(_bits(codec.decode_values(codec.encode_values(v))), _bits(v))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=500))
def test_booleans_round_trip(flags: list[bool]) -> None:
    v = np.array(flags, dtype=np.float64)
    assert np.array_equal(_bits(codec.decode_values(codec.encode_values(v))), _bits(v))


def test_chained_columns_decode_to_their_concatenation() -> None:
    rng = np.random.default_rng(1)
    t = [np.sort(rng.integers(0, 10**12, n)) for n in (0, 1, 40, 900)]
    v = [rng.normal(size=n) for n in (0, 1, 40, 900)] + [np.full(5, 2.5), np.arange(9.0)]
    got_t = codec.decode_ts(codec.chain([codec.encode_ts(x) for x in t]))
    assert np.array_equal(got_t, np.concatenate(t))
    got_v = codec.decode_values(codec.chain([codec.encode_values(x) for x in v]))
    assert np.array_equal(_bits(got_v), _bits(np.concatenate(v)))
    one = codec.encode_ts(t[2])
    assert codec.chain([one]) == one  # a single column is stored as it is


def test_codecs_chosen_per_chunk() -> None:
    n = 1000
    rng = np.random.default_rng(0)
    assert codec.codec_of(codec.encode_values(np.full(n, 21.5))) == codec.CONST
    flips = (rng.random(n) < 0.01).cumsum() % 2
    enc = codec.encode_values(flips.astype(np.float64))
    assert codec.codec_of(enc) == codec.RLE and len(enc) < 0.1 * n
    counter = np.cumsum(rng.integers(0, 50, n)).astype(np.float64)
    enc = codec.encode_values(counter)
    assert codec.codec_of(enc) == codec.DECIMAL and len(enc) < 1.0 * n
    noise = 20 + np.cumsum(rng.normal(0, 0.1, n))
    assert codec.codec_of(codec.encode_values(noise)) == codec.FLOAT
    jitter = 1_700_000_000_000_000 + np.arange(n) * 90_000_000 + rng.integers(0, 3000, n) * 1000
    assert len(codec.encode_ts(jitter)) < 2.0 * n  # ~1.6 bytes/point


def test_strings_round_trip() -> None:
    s = ["a", None, "", "ünïcode", None, "x" * 1000]
    assert codec.decode_strings(codec.encode_strings(s), len(s)) == s


# --- chunk rows -----------------------------------------------------------------------------

points = st.tuples(
    st.sampled_from(["d1", "d2"]),
    st.sampled_from(["temp", "state"]),
    st.integers(0, 3 * 86400 * 10**6),  # three days of microseconds
    st.one_of(float_bits.filter(lambda x: x == x), st.booleans(), st.text(max_size=5)),
    st.sampled_from([0, 0, 0, 1, 2, 3]),  # good, uncertain, bad, stale
)


def _raw(rows: list[tuple[str, str, int, object, int]]) -> pa.Table:
    dev, met, ts, val, q = (list(c) for c in zip(*rows, strict=True)) if rows else ([],) * 5
    num = [None if isinstance(v, str) else float(v) for v in val]
    kind = [2 if isinstance(v, str) else 1 if isinstance(v, bool) else 0 for v in val]
    return pa.Table.from_arrays(
        [
            pa.array(ts, pa.int64()).cast(TS_TYPE),
            pa.array(dev, pa.string()),
            pa.array(["s"] * len(rows), pa.string()),
            pa.array(["g"] * len(rows), pa.string()),
            pa.array([",x,"] * len(rows), pa.string()),
            pa.array(met, pa.string()),
            pa.array(num, pa.float64()),
            pa.array([v if isinstance(v, str) else None for v in val], pa.string()),
            pa.array(kind, pa.uint8()),
            pa.array(q, pa.uint8()),
        ],
        schema=RAW_SCHEMA,
    )


def _canon(t: pa.Table) -> list[tuple[object, ...]]:
    out = []
    for r in t.to_pylist():
        v = r["value"]
        bits = None if v is None else int(np.array([v]).view(np.uint64)[0])
        out.append(
            (r["device"], r["metric"], r["ts"], bits, r["value_str"], r["kind"], r["quality"])
        )
    return sorted(out, key=repr)


@settings(max_examples=100, deadline=None)
@given(st.lists(points, max_size=80), st.sampled_from([3600.0, 86400.0]))
def test_chunks_round_trip_every_point(
    rows: list[tuple[str, str, int, object, int]], chunk_s: float
) -> None:
    raw = _raw(rows)
    chunks = build_chunks(raw, chunk_s, first_cid=1)
    assert int(pa.compute.sum(chunks.column("n")).as_py() or 0) == len(rows)
    assert _canon(decode_chunks(chunks)) == _canon(raw)


@settings(max_examples=100, deadline=None)
@given(st.lists(points, max_size=80), st.sampled_from([3600.0, 86400.0]), st.integers(-1, 40))
def test_trimmed_chunks_equal_chunks_of_the_kept_points(
    rows: list[tuple[str, str, int, object, int]], chunk_s: float, at: int
) -> None:
    """A retention cut (``trim_chunks``) gives the very rows ``build_chunks`` makes of the
    points it keeps: blobs, stats and windows (all but the ids)."""
    raw = _raw(rows)
    cut = sorted(r[2] for r in rows)[at] if rows and 0 <= at < len(rows) else (at * 7_000_000)
    chunks = build_chunks(raw, chunk_s, first_cid=1)
    got, dropped = trim_chunks(chunks, cut, first_cid=100)
    kept = raw.filter(pa.compute.greater_equal(raw.column("ts").cast(pa.int64()), cut))
    want = build_chunks(kept, chunk_s, first_cid=100)
    assert dropped == len(rows) - kept.num_rows
    keys = [("device", "ascending"), ("metric", "ascending"), ("ts", "ascending")]
    assert got.drop_columns(["cid"]).sort_by(keys).equals(want.drop_columns(["cid"]).sort_by(keys))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        points.filter(lambda p: not isinstance(p[3], float) or abs(p[3]) < 1e300), max_size=80
    ),
    st.sampled_from([60.0, 3600.0, 86400.0]),
)
def test_chunk_partials_equal_raw_partials(
    rows: list[tuple[str, str, int, object, int]], bucket: float
) -> None:
    raw = _raw(rows)
    chunks = build_chunks(raw, 3600.0, first_cid=1)
    start, end = 1800.0, 2.5 * 86400
    good = raw.filter(
        pa.compute.and_(
            pa.compute.less(raw.column("quality"), 2),
            pa.compute.and_(
                pa.compute.greater_equal(raw.column("ts").cast(pa.int64()), int(start * 1e6)),
                pa.compute.less(raw.column("ts").cast(pa.int64()), int(end * 1e6)),
            ),
        )
    )
    want = combine(raw_partials(good, bucket), bucket) if good.num_rows else None
    got = combine(chunk_partials(chunks, start, end, bucket), bucket)
    keys = ["device", "metric", "ts"]
    if want is None:
        assert got.num_rows == 0
        return
    want, got = (
        want.sort_by([(k, "ascending") for k in keys]),
        got.sort_by([(k, "ascending") for k in keys]),
    )
    assert got.column("count").to_pylist() == want.column("count").to_pylist()
    for col in ("min", "max", "first_ts", "last_ts"):
        assert got.column(col).to_pylist() == want.column(col).to_pylist()
    np.testing.assert_allclose(
        np.asarray(got.column("sum").to_numpy(zero_copy_only=False), dtype=float),
        np.asarray(want.column("sum").to_numpy(zero_copy_only=False), dtype=float),
        rtol=1e-9,
        equal_nan=True,
    )


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        points.filter(lambda p: not isinstance(p[3], str) and abs(float(p[3])) < 1e300), max_size=80
    ),
    st.sampled_from([60.0, 3600.0, 7.0]),
)
def test_decoded_partials_equal_raw_partials(
    rows: list[tuple[str, str, int, object, int]], bucket: float
) -> None:
    from twin.timeseries.chunks import decoded_partials

    raw = _raw(rows)
    chunks = build_chunks(raw, 3600.0, first_cid=1)
    start, end = 1800.0, 2.5 * 86400
    got = decoded_partials(chunks, start, end, bucket)
    dec = decode_chunks(chunks, start, end)
    dec = dec.filter(pa.compute.less(dec.column("quality"), 2))
    want = raw_partials(dec, bucket) if dec.num_rows else None
    assert got is not None
    if want is None:
        assert got.num_rows == 0
        return
    keys = [(k, "ascending") for k in ("device", "metric", "ts")]
    assert got.sort_by(keys).to_pylist() == want.sort_by(keys).to_pylist()


@settings(max_examples=200, deadline=None)
@given(
    st.integers(-(2**61), 2**61),  # start
    st.integers(1, 10**8),  # step, us
    st.integers(0, 5 * 10**6),  # jitter, us
    st.sampled_from([1, 1000, 10**6]),  # resolution
    st.integers(8, 400),  # points
    st.integers(0, 2**32),  # seed
)
def test_jittered_grid_timestamps_round_trip(
    start: int, step: int, jitter: int, res: int, n: int, seed: int
) -> None:
    """A poller's timestamps (a regular grid with jitter, gaps, repeats, any resolution)
    come back exactly through whichever timestamp codec is chosen."""
    rng = np.random.default_rng(seed)
    t = start + np.arange(n) * step + rng.integers(-jitter, jitter + 1, n)
    t = (t // res) * res
    t = np.sort(np.delete(t, rng.integers(0, n, n // 10)))  # gaps
    t = np.r_[t, t[: n // 20]]  # repeats, out of order
    assert np.array_equal(codec.decode_ts(codec.encode_ts(t)), t)


def test_jittered_poller_timestamps_use_the_grid_codec() -> None:
    rng = np.random.default_rng(1)
    t = 1_700_000_000_000_000 + np.arange(240) * 90_000_000 + rng.integers(-3000, 3001, 240) * 1000
    blob = codec.encode_ts(t)
    assert blob[0] == codec.GRID
    # ~12.6 bits of jitter a point (1.57 B) plus headers; delta-of-delta pays more
    assert len(blob) < 240 * 1.9
    assert len(blob) < 1 + len(codec._pco(t))
    assert np.array_equal(codec.decode_ts(blob), t)
