"""Where SFT records come from: JSONL, Parquet, a `datasets` dir, or a Hub dataset (by id, with a
split; `datasets` caches it, and reads it offline from that cache); and which conversation of a
record is the SFT one (`messages`, or the official SPIN data's `real`)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

ROW_GROUP = 4096  # examples per write, and rows a reader of a file holds at a time


class DataError(ValueError):
    """Bad input data; the message lists every problem with file, line and field."""


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name: a dataset on the Hugging Face Hub (or in its local cache)
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_hub_dataset(source: str | Path) -> bool:
    """A path that is not there, of the form owner/name, and not named like a data file."""
    path = Path(source)
    return not path.exists() and HUB_ID.fullmatch(str(source)) is not None and path.suffix not in FILE_SUFFIXES


def read_rows(path: Path, split: str) -> Iterator[tuple[int | None, Any]]:
    """Yields (line or row number, record); a record that can't be parsed comes as a DataError
    instance, and one about the whole file has no number."""
    if path.is_dir() or is_hub_dataset(path):
        import datasets  # only here: importing it costs ~1 s and most runs read JSONL

        try:
            ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(str(path), split=split)
        except Exception as e:  # noqa: BLE001 - any failure here means "no such dataset" (the message says why)
            what = "a `datasets` directory saved with save_to_disk" if path.is_dir() else "a Hub dataset"
            yield None, DataError(f"cannot load it as {what} ({e})")
            return
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                yield None, DataError(f"DatasetDict has no {split!r} split (has {list(ds)}; set data.*_split)")
                return
            ds = ds[split]
        yield from enumerate(ds)
    elif path.suffix == ".parquet":
        batches = pq.ParquetFile(path).iter_batches(batch_size=ROW_GROUP)
        yield from enumerate(row for batch in batches for row in batch.to_pylist())
    else:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    yield lineno, DataError(f"invalid JSON ({e.msg} at column {e.colno})")


def conversation(record: Any) -> Any:
    """The record's SFT conversation: `messages`, or the official SPIN data's `real` (its
    `generated` column was another model's y'; the run makes its own)."""
    if isinstance(record, dict) and "messages" not in record and "real" in record:
        return {**record, "messages": record["real"]}
    return record
