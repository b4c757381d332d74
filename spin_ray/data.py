"""SFT data in chat form: read, validate (every bad record, before anything expensive), tokenize.

A record is `{"messages": [{"role", "content"}, ...], "id"?: str|int}`. The prompt x is every
message before the last; the real response y is the last, an assistant turn, its ids ending where
the engines stop (spin_ray.chat). Records come from files or the Hub (spin_ray.sources). Token ids
are made here once and travel with the pairs, so engines and trainer score exactly the same tokens.

The training set is streamed: read, checked and written as a tokenized parquet file record by
record (`write_training_set`), then read back in batches; what stays in memory per record is a
few 64-bit digests for the duplicate checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from array import array
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from spin_ray.chat import encode, stop_token_ids
from spin_ray.sources import ROW_GROUP, DataError, conversation, is_hub_dataset, read_rows

ROLES = ("system", "user", "assistant", "tool")
TRAIN_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("prompt", pa.string()),
        ("real", pa.string()),
        ("prompt_ids", pa.list_(pa.int64())),
        ("real_ids", pa.list_(pa.int64())),
    ]
)
MAX_BUCKETS = 256  # write_permuted's files open at once: well under the usual 1,024 open files


@dataclass(frozen=True)
class Example:
    uid: str
    prompt_messages: list[dict[str, str]]
    prompt: str  # the chat-templated prompt text the model sees
    real: str
    prompt_ids: list[int]
    real_ids: list[int]


def _check_messages(record: Any) -> list[str]:
    """Problems with one record's structure, each naming the field."""
    if not isinstance(record, dict):
        return [f"record is a {type(record).__name__}, expected an object with `messages`"]
    if "messages" not in record:
        return ["field `messages` is missing (or `real`, in the official SPIN data's schema)"]
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return ["field `messages` must be a non-empty list"]
    problems = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{where} must be an object with `role` and `content`")
            continue
        if m.get("role") not in ROLES:
            problems.append(f"{where}.role is {m.get('role')!r}, expected one of {list(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            problems.append(f"{where}.content must be a non-empty string")
    if not problems and messages[-1]["role"] != "assistant":
        problems.append(f"messages[{len(messages) - 1}].role must be 'assistant' (the real response)")
    if not problems and len(messages) < 2:
        problems.append("`messages` needs at least one prompt turn before the assistant response")
    return problems


def _given_id(record: dict[str, Any]) -> str | None:
    return str(record["id"]) if record.get("id") is not None else None


def _content_hash(messages: list[dict[str, str]]) -> str:
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _digest(value: Any) -> int:
    """64 bits of a value's hash: what the checks below keep per record instead of the record."""
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little", signed=True)


class Census:
    """What a data set holds, counted as it streams by from two digests per record: repeated
    prompts are how p_data(y|x) shows several answers per x, and exact duplicate records are
    counted, not rejected."""

    def __init__(self) -> None:
        self.prompts, self.records = array("q"), array("q")

    def add(self, e: Example) -> int:
        """Counts `e`; returns its record digest."""
        self.prompts.append(_digest(e.prompt_ids))
        self.records.append(_digest((e.prompt_ids, e.real)))
        return self.records[-1]

    def summary(self) -> dict[str, int]:
        _, counts = np.unique(np.frombuffer(self.prompts, dtype=np.int64), return_counts=True)
        distinct_records = len(np.unique(np.frombuffer(self.records, dtype=np.int64)))
        return {
            "records": len(self.records),
            "distinct_prompts": len(counts),
            "records_with_repeated_prompt": int(counts[counts > 1].sum()),
            "duplicate_records": len(self.records) - distinct_records,
        }


def read_sft(
    path: str | Path,
    tokenizer: Any,
    *,
    max_prompt_tokens: int | None,
    max_response_tokens: int | None,
    long_prompts: str = "error",
    dedupe: str = "none",
    stops: Collection[int] | None = None,
    context: int | None = None,
    split: str = "train",
) -> Iterator[Example]:
    """Validates and tokenizes a file, a `datasets` dir or a Hub dataset (their `split`) record by
    record, yielding the usable examples; at the end raises DataError listing every bad record, so
    a caller keeps nothing it wrote before then.

    Records without an `id` get `<content hash>-<occurrence>`: unique per record, equal across
    loads of the same file, so equal records stay separate examples with their own sampling seeds.
    `dedupe="records"` yields only the first of exactly equal records. Real answers end at the first
    of `stops` (default: stop_token_ids of the tokenizer alone). A limit left None is the model's
    `context`: a prompt must leave room for an answer, and an answer is cut where the context ends.
    Long on purpose: one pass whose checks (ids, duplicates, lengths, census) share per-file state.
    """
    path = Path(path)
    if not path.exists() and not is_hub_dataset(path):
        raise DataError(f"{path}: file does not exist (nor is it a Hub dataset id, owner/name)")
    table = path.is_dir() or path.suffix == ".parquet" or is_hub_dataset(path)

    def where(n: int | None) -> str:
        """`file:line` in JSONL, `file:row i` in a table, the file alone for the whole file."""
        return str(path) if n is None else f"{path}:row {n}" if table else f"{path}:{n}"

    stops = set(stop_token_ids(tokenizer) if stops is None else stops)
    prompt_limit = max_prompt_tokens or (context or math.inf) - 2
    problems: list[str] = []
    first_at: dict[int, int | None] = {}  # uid digest -> where that uid was first
    occurrences: Counter[int] = Counter()  # content digest -> records so far (records without an id)
    kept: set[int] = set()  # record digests, for dedupe=records
    census = Census()
    skipped = 0
    rows = 0
    for n, raw in read_rows(path, split):
        rows += 1
        if isinstance(raw, DataError):
            problems.append(f"{where(n)}: {raw}")
            continue
        record = conversation(raw)
        bad = _check_messages(record)
        if bad:
            problems.extend(f"{where(n)}: {b}" for b in bad)
            continue
        uid = _given_id(record)
        if uid is None:
            content = _content_hash(record["messages"])
            digest = int(content, 16)  # an int costs half a 16-character str per record
            uid = f"{content}-{occurrences[digest]}"
            occurrences[digest] += 1
        if (key := _digest(uid)) in first_at:
            problems.append(f"{where(n)}: field `id` {uid!r} duplicates {where(first_at[key])}")
            continue
        first_at[key] = n
        prompt_ids, real_ids = encode(tokenizer, record["messages"], stops)
        if len(prompt_ids) > prompt_limit:
            if long_prompts == "skip":
                skipped += 1
                continue
            over = f"data.max_prompt_tokens={max_prompt_tokens}" if max_prompt_tokens else f"the context ({context})"
            problems.append(
                f"{where(n)}: prompt (`messages[:-1]`) is {len(prompt_ids)} tokens, over {over} "
                "(or set data.long_prompts=skip)"
            )
            continue
        # One position stays free: scoring a (prompt, answer) asks the engine for one more token.
        room = max_response_tokens or (context - 1 - len(prompt_ids) if context else len(real_ids))
        example = Example(
            uid=uid,
            prompt_messages=record["messages"][:-1],
            prompt=tokenizer.decode(prompt_ids),
            real=record["messages"][-1]["content"],
            prompt_ids=prompt_ids,
            real_ids=real_ids[:room],
        )
        record_key = census.add(example)
        if dedupe == "records":
            if record_key in kept:
                continue
            kept.add(record_key)
        yield example
    if rows == 0:
        problems.append(f"{path}: file is empty")
    if problems:
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DataError(f"{len(problems)} problem(s) in {path}:\n  " + "\n  ".join(shown) + more)
    if skipped:
        print(f"[data] {path}: skipped {skipped} of {rows} records with prompts over {prompt_limit} tokens")
    if not census.records:
        raise DataError(f"{path}: no usable records left (skipped {skipped} over-long prompts)")
    summary = census.summary()
    print(f"[data] {path}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in summary.items()))
    if dedupe == "records":
        print(f"[data] {path}: data.dedupe=records dropped {summary['duplicate_records']} duplicate records")


def load_sft(path: str | Path, tokenizer: Any, **kwargs: Any) -> list[Example]:
    """A whole (held-out) file in memory; read_sft's arguments."""
    return list(read_sft(path, tokenizer, **kwargs))


@dataclass(frozen=True)
class TrainingSet:
    """The tokenized training examples, in a parquet file (TRAIN_SCHEMA) that every process reads
    in batches: none holds the whole set. The token counts are for the dry run's plan."""

    path: Path | None  # None: counted, not written (a dry run)
    records: int
    fingerprint: str  # of the token ids: to refuse resuming a run made on other data
    prompt_tokens: int
    real_lengths: dict[int, int]  # real response length -> records
    longest_prompt: int


def write_training_set(examples: Iterator[Example], dest: Path | None, max_examples: int | None) -> TrainingSet:
    """Writes the first `max_examples` examples to `dest` as they come; the rest are still read
    (and so validated)."""
    h = hashlib.sha256()
    lengths: Counter[int] = Counter()
    records = prompt_tokens = longest_prompt = 0
    buffer: list[dict[str, Any]] = []
    with pq.ParquetWriter(dest, TRAIN_SCHEMA) if dest else contextlib.nullcontext() as writer:
        for e in examples:
            if records == max_examples:
                continue
            records += 1
            h.update(json.dumps([e.uid, e.prompt_ids, e.real_ids]).encode())
            prompt_tokens += len(e.prompt_ids)
            longest_prompt = max(longest_prompt, len(e.prompt_ids))
            lengths[len(e.real_ids)] += 1
            buffer.append({k: getattr(e, k) for k in TRAIN_SCHEMA.names})
            if writer and len(buffer) == ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(buffer, TRAIN_SCHEMA))
                buffer.clear()
        if writer and buffer:
            writer.write_table(pa.Table.from_pylist(buffer, TRAIN_SCHEMA))
    return TrainingSet(dest, records, h.hexdigest()[:16], prompt_tokens, dict(lengths), longest_prompt)


def write_permuted(
    src: Path, order: np.ndarray, dest: Path, part_rows: int, add: Callable[[pa.Table], pa.Table]
) -> list[Path]:
    """`src`'s rows reordered (row j out is row order[j] in), plus the columns `add` makes, as
    dest/part-<k>.parquet files of `part_rows` rows. An external shuffle holding about ROW_GROUP
    rows at a time: each row goes to the bucket file of its output range, then each bucket is
    sorted and cut into parts. Past MAX_BUCKETS * ROW_GROUP rows the buckets grow instead of their
    number (each is an open file while rows are dealt)."""
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    per_bucket = part_rows * max(1, ROW_GROUP // part_rows, math.ceil(len(order) / (MAX_BUCKETS * part_rows)))
    dest.mkdir(parents=True, exist_ok=True)
    buckets: dict[int, pa.ipc.RecordBatchFileWriter] = {}  # Arrow IPC: cheap to append small pieces to
    start = 0
    for batch in pq.ParquetFile(src).iter_batches(batch_size=ROW_GROUP):
        at = position[start : start + batch.num_rows]
        start += batch.num_rows
        table = add(pa.Table.from_batches([batch])).append_column("position", pa.array(at))
        bucket = at // per_bucket
        for b in np.unique(bucket):
            piece = table.filter(pa.array(bucket == b))
            if b not in buckets:
                buckets[b] = pa.ipc.new_file(dest / f"bucket-{b}.arrow", piece.schema)
            buckets[b].write_table(piece)
    parts = []
    for b in sorted(buckets):
        buckets[b].close()
        path = dest / f"bucket-{b}.arrow"
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all().sort_by("position").drop_columns(["position"])
        path.unlink()
        for i in range(0, table.num_rows, part_rows):
            parts.append(dest / f"part-{len(parts):06d}.parquet")
            pq.write_table(table.slice(i, part_rows), parts[-1])
    return parts


def pad_pairs(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response batch with a mask that is 1 on response tokens only."""
    seqs = [p + r for p, r in zip(prompt_ids, response_ids, strict=True)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    response_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompt_ids, seqs, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        response_mask[i, len(p) : len(s)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
