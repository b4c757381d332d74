"""The pair stream (spin.stream): equal steps per rank on odd sizes, every pair once, and an
order that replays exactly from disk (what a restarted trainer group and a resumed run get)."""

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spin_ray.pairs import Generation, deal, pair_stream, window_shuffle


def pairs_table(prefix: str, n: int) -> pa.Table:
    ids = {"prompt_ids": 1, "real_ids": 2, "generated_ids": 3}
    rows = [{"uid": f"{prefix}{i}", **{k: [v, i] for k, v in ids.items()}, "generated_tokens": 2} for i in range(n)]
    return pa.Table.from_pylist(rows)


def store(path, table: pa.Table, per_file: int) -> None:
    path.mkdir(parents=True)
    for k, start in enumerate(range(0, table.num_rows, per_file)):
        pq.write_table(table.slice(start, per_file), path / f"part-{k:06d}.parquet")


def flatten(steps) -> list[list[str]]:
    """Per step, the uids each rank gets, in order."""
    return [[uid for table in step for uid in table["uid"].to_pylist()] for step in steps]


def test_deal_gives_every_rank_the_same_rows_per_step_on_an_odd_count():
    rows = iter(pairs_table("x", 23).to_pylist())
    steps = list(deal(rows, ranks=2, batch_size=4, total=23))
    assert [[t.num_rows for t in step] for step in steps] == [[4, 4], [4, 4], [3, 3]]  # 11 per rank, 1 dropped
    uids = [u for step in steps for t in step for u in t["uid"].to_pylist()]
    assert uids == [f"x{i}" for i in range(22)]


def test_deal_refuses_a_stream_that_ends_early():
    with pytest.raises(RuntimeError, match="ended 2 pairs early"):
        list(deal(iter(pairs_table("x", 6).to_pylist()), ranks=2, batch_size=4, total=8))


def test_window_shuffle_keeps_every_row_and_moves_them_at_most_a_window_early():
    out = list(window_shuffle(iter(range(100)), 8, np.random.default_rng(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert all(value <= position + 8 for position, value in enumerate(out))  # bounded: no row jumps ahead


def test_stream_from_the_engines_replays_exactly_from_disk(tmp_path):
    """Iteration 2: 37 stored pairs of iteration 1 and 25 new ones arriving in batches of 4.
    Streamed live and replayed from the stored parts, the ranks get the same rows in the same
    steps; every pair appears once; the step shapes are equal per rank."""
    store(tmp_path / "iter_1" / "pairs", pairs_table("old", 37), per_file=10)
    new = pairs_table("new", 25)
    batches = (new.slice(start, 4) for start in range(0, 25, 4))
    generation = Generation(batches, tmp_path / "iter_2" / "pairs.tmp", expected=25)
    live = pair_stream([tmp_path / "iter_1" / "pairs"], generation, seed=7, window=16, batch_size=4)
    assert live.total == 62
    streamed = list(live.steps(2))
    assert generation.wait().metrics()["gen/tokens_per_s"] > 0
    (tmp_path / "iter_2" / "pairs.tmp").rename(tmp_path / "iter_2" / "pairs")
    stored = [tmp_path / "iter_1" / "pairs", tmp_path / "iter_2" / "pairs"]
    replayed = list(pair_stream(stored, None, seed=7, window=16, batch_size=4).steps(2))
    assert flatten(streamed) == flatten(replayed)
    assert all(step[0].num_rows == step[1].num_rows for step in streamed)
    dealt = [u for step in flatten(streamed) for u in step]
    assert len(dealt) == 62 and len(set(dealt)) == 62  # 31 per rank; nothing dropped, nothing twice
    # Both sources are spread over the stream, not one after the other.
    first_half = Counter(u[:3] for u in dealt[:31])
    assert 8 <= first_half["new"] <= 20
    assert pq.read_table(tmp_path / "iter_2" / "pairs")["uid"].to_pylist() == new["uid"].to_pylist()  # prompt order


def test_generation_errors_reach_the_reader(tmp_path):
    def failing():
        yield pairs_table("a", 3)
        raise ConnectionError("engine pool gave up")

    generation = Generation(failing(), tmp_path / "pairs.tmp", expected=6)
    stream = pair_stream([], generation, seed=0, window=2, batch_size=1)
    with pytest.raises(ConnectionError, match="gave up"):
        list(stream.steps(1))


def test_a_full_disk_while_writing_pairs_stops_with_a_clear_error_and_keeps_what_is_stored(tmp_path, monkeypatch):
    import errno

    write = pq.write_table
    written = []

    def disk_fills_after_two(table, where, **kwargs):
        if len(written) == 2:
            Path(where).write_bytes(b"PAR1 half")  # what a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(where)
        write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", disk_fills_after_two)
    batches = (pa.table({"uid": [f"u{k}"], "generated_tokens": [3]}) for k in range(4))
    generation = Generation(batches, tmp_path / "pairs.tmp", 4)
    with pytest.raises(RuntimeError, match=r"part-000002.parquet: .*No space left.* 2 batches .* kept"):
        generation.wait()
    assert sorted(p.name for p in (tmp_path / "pairs.tmp").iterdir()) == ["part-000000.parquet", "part-000001.parquet"]
    assert pq.read_table(tmp_path / "pairs.tmp")["uid"].to_pylist() == ["u0", "u1"]
