"""SFT data in chat form: read, validate (every bad record, before anything expensive), tokenize.

A record is `{"messages": [{"role", "content"}, ...], "id"?: str|int}`. The prompt x is every
message before the last; the real response y is the last, an assistant turn. Token ids are made
here once and travel with the pairs, so engines and trainer score exactly the same tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad input data; the message lists every problem with file, line and field."""


@dataclass(frozen=True)
class Example:
    uid: str
    prompt_messages: list[dict[str, str]]
    prompt: str  # the chat-templated prompt text the model sees
    real: str
    prompt_ids: list[int]
    real_ids: list[int]


def _read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yields (location, record); a record that can't be parsed comes as a DataError instance."""
    if path.is_dir():
        import datasets  # only here: importing it costs ~1 s and most runs read JSONL

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - any failure here means "not a saved dataset"
            yield f"{path}", DataError(f"not a `datasets` directory saved with save_to_disk ({e})")
            return
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                yield f"{path}", DataError(f"DatasetDict has no 'train' split (has {list(ds)})")
                return
            ds = ds["train"]
        for i, row in enumerate(ds):
            yield f"{path}:row {i}", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", row
    else:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{lineno}", DataError(f"invalid JSON ({e.msg} at column {e.colno})")


def _check_messages(record: Any) -> list[str]:
    """Problems with one record's structure, each naming the field."""
    if not isinstance(record, dict):
        return [f"record is a {type(record).__name__}, expected an object with `messages`"]
    if "messages" not in record:
        return ["field `messages` is missing"]
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


def summarize(examples: list[Example]) -> dict[str, int]:
    """What a data set holds: repeated prompts are how p_data(y|x) shows several answers per x,
    and exact duplicate records are counted, not rejected."""
    prompts = Counter(tuple(e.prompt_ids) for e in examples)
    records = Counter((tuple(e.prompt_ids), e.real) for e in examples)
    return {
        "records": len(examples),
        "distinct_prompts": len(prompts),
        "records_with_repeated_prompt": sum(n for n in prompts.values() if n > 1),
        "duplicate_records": sum(n - 1 for n in records.values()),
    }


def encode(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(prompt ids with the generation prompt, response ids incl. the template's end of turn)."""
    prompt_ids = list(
        tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
    )
    full_ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full_ids[len(prompt_ids) :]
    # Templates that rewrite earlier turns (e.g. strip reasoning) break the prefix property.
    response = tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
    return prompt_ids, response + [tokenizer.eos_token_id]


def load_sft(
    path: str | Path,
    tokenizer: Any,
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    long_prompts: str = "error",
    dedupe: str = "none",
    max_examples: int | None = None,
) -> list[Example]:
    """Reads and validates a whole file; raises DataError listing every bad record.

    Records without an `id` get `<content hash>-<occurrence>`: unique per record, equal across
    loads of the same file, so equal records stay separate examples with their own sampling seeds.
    `dedupe="records"` keeps only the first of exactly equal records; `max_examples` applies last.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    examples: list[Example] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    occurrences: Counter[str] = Counter()
    skipped = 0
    rows = 0
    for where, record in _read_rows(path):
        rows += 1
        if isinstance(record, DataError):
            problems.append(f"{where}: {record}")
            continue
        bad = _check_messages(record)
        if bad:
            problems.extend(f"{where}: {b}" for b in bad)
            continue
        uid = _given_id(record)
        if uid is None:
            content = _content_hash(record["messages"])
            uid = f"{content}-{occurrences[content]}"
            occurrences[content] += 1
        if uid in seen:
            problems.append(f"{where}: field `id` {uid!r} duplicates {seen[uid]}")
            continue
        seen[uid] = where
        prompt_ids, real_ids = encode(tokenizer, record["messages"])
        if len(prompt_ids) > max_prompt_tokens:
            if long_prompts == "skip":
                skipped += 1
                continue
            problems.append(
                f"{where}: prompt (`messages[:-1]`) is {len(prompt_ids)} tokens, over "
                f"data.max_prompt_tokens={max_prompt_tokens} (or set data.long_prompts=skip)"
            )
            continue
        examples.append(
            Example(
                uid=uid,
                prompt_messages=record["messages"][:-1],
                prompt=tokenizer.decode(prompt_ids),
                real=record["messages"][-1]["content"],
                prompt_ids=prompt_ids,
                real_ids=real_ids[:max_response_tokens],
            )
        )
    if rows == 0:
        problems.append(f"{path}: file is empty")
    if problems:
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DataError(f"{len(problems)} problem(s) in {path}:\n  " + "\n  ".join(shown) + more)
    if skipped:
        print(f"[data] {path}: skipped {skipped} of {rows} records with prompts over {max_prompt_tokens} tokens")
    if not examples:
        raise DataError(f"{path}: no usable records left (skipped {skipped} over-long prompts)")
    summary = summarize(examples)
    print(f"[data] {path}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in summary.items()))
    if dedupe == "records":
        kept: dict[tuple, Example] = {}
        for e in examples:
            kept.setdefault((tuple(e.prompt_ids), e.real), e)
        examples = list(kept.values())
        print(f"[data] {path}: data.dedupe=records dropped {summary['duplicate_records']} duplicate records")
    return examples[:max_examples] if max_examples else examples


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
