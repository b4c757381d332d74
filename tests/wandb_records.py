"""Reads the history of an offline W&B run from its .wandb file (wandb >= 0.30 ships no reader).

The file is ':W&B' + magic + version (7 bytes), then LevelDB-log records in 32 KiB blocks: each
chunk has a 7-byte header (crc32, little-endian length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4).
"""

import json
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768


def records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, partial, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # block trailer / zero padding
            pos += left
            continue
        partial += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(partial)
            partial = b""
    return out


def history(run_dir: Path) -> list[dict]:
    """Every wandb.log() row of the offline runs under run_dir/wandb/ (a resumed job adds one)."""
    rows = []
    for raw in (r for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")) for r in records(path)):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            items = rec.history.item
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows
